"""Drift: how a video's quality changes from its start to its end (HiAR, section 4; docs/evaluation.md).

A video (uint8 [F, H, W, 3], RGB) is measured frame by frame (or frame pair by frame pair), split into
S equal segments (default 5), each metric is averaged per segment, and a least-squares line is fitted
through the segment values against time. The time axis is the fraction of the video (a frame t of F sits
at (t + 0.5) / F, a segment at the mean of its frames), so a slope is the fitted change from the first
frame to the last, in the metric's own unit, whatever the video's length or S.

The Drift Score is published here, not hidden: each metric's slope is divided by the metric's level in
the first segment (the relative change over the video; a floor stops near-zero levels from blowing it
up), and the score is the weighted mean of those absolute relative slopes over the metrics that were
measured:

    drift = sum_m WEIGHTS[m] * |slope_m| / max(|first_m|, FLOORS[m])  /  sum_m WEIGHTS[m]

so 0.2 reads "the metrics moved by 20% of their starting level over the video, on average". Only scores
computed over the same metric set compare (the set is written next to every score). The six metrics the
paper names get weight 1, our additional cheap ones 0.5.

Every metric here needs no downloaded weights; `load_weighted_metrics` adds the ones that do (DINOv2,
CLIP-IQA through transformers; LPIPS, MUSIQ through their packages) from a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hiar.toyworld import BACKGROUNDS, OBJECT_COLOURS, measure_frame, parse_caption, torus_distance

DEFAULT_SEGMENTS = 5


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool | None  # None: neither (brightness, motion: a change is the signal, not a loss)
    description: str


METRICS = {m.name: m for m in [
    Metric("saturation", "0-1", True, "mean HSV saturation"),
    Metric("sharpness", "grey^2", True, "variance of the Laplacian of the grey frame"),
    Metric("brightness", "0-1", None, "mean luma (Rec. 601 grey)"),
    Metric("colourfulness", "Hasler-Suesstrunk", True, "Hasler and Suesstrunk (2003) colourfulness"),
    Metric("frame_l1", "grey levels", None, "mean |frame t - frame t-1| over pixels and channels (0-255)"),
    Metric("ssim", "0-1", True, "SSIM of consecutive grey frames (Wang et al. 2004, 11x11 Gaussian, sigma 1.5)"),
    Metric("motion", "px/frame", None, "mean magnitude of dense optical flow (OpenCV Farneback)"),
    Metric("toy_background_error", "RGB distance", False,
           "mean RGB distance of the background pixels to the prompted background colour"),
    Metric("toy_object_error", "RGB distance", False,
           "mean RGB distance of each prompted object's pixels to its prompted colour"),
    Metric("toy_presence", "0-1", True, "fraction of the prompted objects measured in the frame"),
    Metric("toy_area", "px", None, "mean area of the prompted objects (constant in the toy world)"),
    Metric("toy_speed", "px/frame", None, "mean centroid step of the prompted objects (constant in the toy world)"),
]}
# Metrics that need weights: registered so that names, units and the Drift Score know them.
WEIGHTED_METRICS = {m.name: m for m in [
    Metric("lpips", "0-1", False, "LPIPS (AlexNet) between consecutive frames"),
    Metric("dinov2", "cosine", True, "cosine similarity of DINOv2 CLS features of consecutive frames"),
    Metric("musiq", "0-100", True, "MUSIQ (KonIQ) image quality"),
    Metric("clip_iqa", "0-1", True, "CLIP-IQA: softmax of CLIP similarity to 'Good photo.' vs 'Bad photo.'"),
]}
ALL_METRICS = {**METRICS, **WEIGHTED_METRICS}

# The Drift Score's weights and normalisation floors (module docstring). Toy metrics are left out: they
# exist only for toy videos, and a score must mean the same thing for any video.
WEIGHTS = {"saturation": 1.0, "sharpness": 1.0, "lpips": 1.0, "dinov2": 1.0, "musiq": 1.0, "clip_iqa": 1.0,
           "brightness": 0.5, "colourfulness": 0.5, "frame_l1": 0.5, "ssim": 0.5, "motion": 0.5}
FLOORS = {"saturation": 0.05, "sharpness": 10.0, "lpips": 0.05, "dinov2": 0.05, "musiq": 5.0, "clip_iqa": 0.05,
          "brightness": 0.05, "colourfulness": 5.0, "frame_l1": 1.0, "ssim": 0.05, "motion": 0.25}


# -- per-frame metrics (uint8 RGB [H, W, 3] -> float) ----------------------------------------------------

def _grey(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def saturation(frame: np.ndarray) -> float:
    return float(cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)[..., 1].mean() / 255)


def sharpness(frame: np.ndarray) -> float:
    return float(cv2.Laplacian(_grey(frame), cv2.CV_64F).var())


def brightness(frame: np.ndarray) -> float:
    return float(_grey(frame).mean() / 255)


def colourfulness(frame: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003), eq. 3: sigma_rgyb + 0.3 mu_rgyb over rg = R - G, yb = (R + G) / 2 - B."""
    r, g, b = (frame[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def frame_l1(prev: np.ndarray, frame: np.ndarray) -> float:
    return float(np.abs(frame.astype(np.int16) - prev.astype(np.int16)).mean())


def ssim(prev: np.ndarray, frame: np.ndarray) -> float:
    """Mean SSIM of two grey frames (Wang et al. 2004, eq. 13): Gaussian 11x11 window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, dynamic range 255."""
    x, y = _grey(prev).astype(np.float64), _grey(frame).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda a: cv2.GaussianBlur(a, (11, 11), 1.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean())


def motion(prev: np.ndarray, frame: np.ndarray) -> float:
    """Mean optical-flow magnitude in pixels (Farneback: 3 levels, scale 0.5, window 15, 3 iterations)."""
    flow = cv2.calcOpticalFlowFarneback(_grey(prev), _grey(frame), None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return float(np.linalg.norm(flow, axis=-1).mean())


FRAME_FNS: dict[str, Callable[[np.ndarray], float]] = {
    "saturation": saturation, "sharpness": sharpness, "brightness": brightness, "colourfulness": colourfulness}
PAIR_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"frame_l1": frame_l1, "ssim": ssim, "motion": motion}


# -- toy-world ground truth --------------------------------------------------------------------------------

def toy_frame(frame: np.ndarray, wanted: dict) -> dict:
    """Colour errors against the caption (parse_caption output) and each prompted object's area and
    centroid (None where it is not measured). The colour errors segment the frame by the nearest
    *prompted* colour, so a background drifting towards another palette colour still counts against
    the prompted one."""
    ref = np.array([BACKGROUNDS[wanted["background"]], *(OBJECT_COLOURS[o["colour"]] for o in wanted["objects"])],
                   np.float32)  # [1 + K, 3]
    distance = np.linalg.norm(frame.reshape(-1, 1, 3).astype(np.float32) - ref[None], axis=-1)  # [H*W, 1 + K]
    label = distance.argmin(axis=1)
    errors = [float(distance[label == k, k].mean()) if (label == k).any() else math.nan for k in range(len(ref))]
    # Measured on the torus: in the world that wraps an object crossing a border is rejoined, and in the
    # one that bounces no object spans two opposite borders, so nothing changes there (toyworld.torus_roll).
    measured = {o.colour: o for o in measure_frame(frame, motion="wrap").objects}
    found = [measured.get(o["colour"]) for o in wanted["objects"]]
    return {"background_error": errors[0], "object_error": _mean(np.array(errors[1:])),
            "areas": [o.area if o else None for o in found], "centroids": [o.centroid if o else None for o in found]}


def _toy_series(frames: np.ndarray, caption: str) -> dict[str, np.ndarray]:
    wanted = parse_caption(caption)
    per = [toy_frame(f, wanted) for f in frames]
    area = [_mean(np.array([a for a in p["areas"] if a is not None], np.float64)) for p in per]
    height, width = frames.shape[1:3]
    speed = [_mean(np.array([torus_distance(p, q, height, width) for p, q in zip(a["centroids"], b["centroids"])
                             if p is not None and q is not None])) for a, b in zip(per, per[1:])]
    return {"toy_background_error": np.array([p["background_error"] for p in per]),
            "toy_object_error": np.array([p["object_error"] for p in per]),
            "toy_presence": np.array([np.mean([a is not None for a in p["areas"]]) for p in per]),
            "toy_area": np.array(area), "toy_speed": np.array(speed)}


# -- a whole video ------------------------------------------------------------------------------------------

def frame_series(frames: np.ndarray, caption: str | None = None,
                 extra: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Every metric along the video: frame metrics [F], pair metrics [F - 1] (value t is the pair
    (t, t + 1)). Toy metrics when `caption` is a toy-world caption; `extra` maps names to functions of
    the whole video (the weighted metrics)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if len(frames) < 2:
        raise ValueError(f"a video needs at least 2 frames to measure change, got {len(frames)}")
    series = {name: np.array([fn(f) for f in frames]) for name, fn in FRAME_FNS.items()}
    series |= {name: np.array([fn(a, b) for a, b in zip(frames, frames[1:])]) for name, fn in PAIR_FNS.items()}
    if caption is not None and parse_caption(caption) is not None:
        series |= _toy_series(frames, caption)
    for name, fn in (extra or {}).items():
        series[name] = np.asarray(fn(frames), np.float64)
    return series


def segment_bounds(num_frames: int, num_segments: int = DEFAULT_SEGMENTS) -> list[tuple[int, int]]:
    """[start, end) frame ranges of `num_segments` equal (to a frame) consecutive segments."""
    if num_segments < 2 or num_frames < num_segments:
        raise ValueError(f"cannot split {num_frames} frames into {num_segments} segments (need 2 <= segments <= frames)")
    edges = np.linspace(0, num_frames, num_segments + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]


def fit_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against x, ignoring NaN values (NaN if fewer than 2 remain)."""
    keep = ~np.isnan(y)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(x[keep], y[keep], 1)[0])


def _mean(values: np.ndarray) -> float:
    """Mean of the measured values (NaN: not measured in that frame, e.g. an object not found)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def segment_drift(series: dict[str, np.ndarray], num_frames: int, num_segments: int = DEFAULT_SEGMENTS,
                  timeline_bins: int = 0) -> dict:
    """Per-segment values, slope (change over the whole video), first-to-last gap and Drift Score.

    A pair metric's value t, the change from frame t to t + 1, is placed at frame t + 1. With
    `timeline_bins`, also each metric's mean in that many equal bins (finer, for plots)."""
    x = (np.arange(num_frames) + 0.5) / num_frames  # fraction of the video at each frame
    placed = {}
    for name, values in series.items():
        placed[name] = np.full(num_frames, np.nan)
        placed[name][num_frames - len(values):] = values  # pair metrics start at frame 1

    def binned(bounds):
        return [float(x[a:b].mean()) for a, b in bounds], {n: [_mean(v[a:b]) for a, b in bounds]
                                                           for n, v in placed.items()}

    bounds = segment_bounds(num_frames, num_segments)
    times, per_segment = binned(bounds)
    out: dict = {"segments": bounds, "segment_time": times, "per_segment": per_segment,
                 "slope": {}, "gap": {}, "relative_slope": {}}
    for name, values in per_segment.items():
        slope = fit_slope(np.array(times), np.array(values))
        out["slope"][name] = slope
        out["gap"][name] = values[-1] - values[0]
        if name in WEIGHTS:
            out["relative_slope"][name] = slope / max(abs(values[0]), FLOORS[name])
    if timeline_bins:
        out["timeline_time"], out["timeline"] = binned(segment_bounds(num_frames, min(timeline_bins, num_frames)))
    out["drift_score"] = drift_score(out["relative_slope"])
    return out


def drift_score(relative_slopes: dict[str, float]) -> float:
    """Weighted mean of |relative slope| over the metrics measured (module docstring)."""
    used = {m: s for m, s in relative_slopes.items() if m in WEIGHTS and not math.isnan(s)}
    if not used:
        return math.nan
    return sum(WEIGHTS[m] * abs(s) for m, s in used.items()) / sum(WEIGHTS[m] for m in used)


# -- metrics that need weights ------------------------------------------------------------------------------

def load_weighted_metrics(folder: str | Path | None, device: str = "cpu") -> tuple[dict, list[str]]:
    """The weighted metrics whose weights are in `folder`, as functions of a video, and one notice per
    metric that is skipped. Expected layout: folder/dinov2 and folder/clip (transformers folders),
    folder/lpips (the `lpips` package's alex.pth), folder/musiq (pyiqa's musiq_koniq checkpoint)."""
    fns, notices = {}, []
    if folder is None:
        return fns, [f"{name}: skipped (no --weights folder given)" for name in WEIGHTED_METRICS]
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"weights folder {folder} does not exist")
    for name, loader in (("dinov2", _load_dinov2), ("clip_iqa", _load_clip_iqa), ("lpips", _load_lpips),
                         ("musiq", _load_musiq)):
        try:
            fns[name] = loader(folder / name.split("_")[0], device)
        except _Skip as why:
            notices.append(f"{name}: skipped ({why})")
    return fns, notices


class _Skip(Exception):
    pass


def _need(path: Path) -> None:
    if not path.exists():
        raise _Skip(f"{path} not found")


def _batched(frames: np.ndarray, fn: Callable, batch: int = 16) -> np.ndarray:
    return np.concatenate([fn(frames[i:i + batch]) for i in range(0, len(frames), batch)])


def _load_dinov2(path: Path, device: str) -> Callable:
    _need(path / "config.json")
    import torch
    from transformers import AutoImageProcessor, AutoModel

    processor, model = AutoImageProcessor.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()

    def features(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            inputs = processor(images=list(frames), return_tensors="pt").to(device)
            cls = model(**inputs).last_hidden_state[:, 0]  # [B, D]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu().numpy()

    def similarity(frames: np.ndarray) -> np.ndarray:
        f = _batched(frames, features)  # [F, D]
        return (f[1:] * f[:-1]).sum(-1)  # [F - 1]

    return similarity


def _load_clip_iqa(path: Path, device: str) -> Callable:
    """CLIP-IQA (Wang et al. 2023), the antonym-prompt form: softmax over ('Good photo.', 'Bad photo.')."""
    _need(path / "config.json")
    import torch
    from transformers import CLIPModel, CLIPProcessor

    processor, model = CLIPProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).to(device).eval()
    with torch.no_grad():
        text = processor(text=["Good photo.", "Bad photo."], return_tensors="pt", padding=True).to(device)
        prompts = torch.nn.functional.normalize(model.get_text_features(**text).float(), dim=-1)  # [2, D]

    def score(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            image = processor(images=list(frames), return_tensors="pt").to(device)
            feats = torch.nn.functional.normalize(model.get_image_features(**image).float(), dim=-1)  # [B, D]
            return (100 * feats @ prompts.T).softmax(-1)[:, 0].cpu().numpy()

    return lambda frames: _batched(frames, score)


def _load_lpips(path: Path, device: str) -> Callable:
    try:
        import lpips
    except ImportError:
        raise _Skip("needs the `lpips` package, not in requirements.txt") from None
    _need(path / "alex.pth")
    import torch

    model = lpips.LPIPS(net="alex", model_path=str(path / "alex.pth"), verbose=False).to(device).eval()

    def distance(frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # [F, 3, H, W]
        with torch.no_grad():
            return np.concatenate([model(x[i:i + 16], x[i + 1:i + 17]).flatten().cpu().numpy()
                                   for i in range(0, len(x) - 1, 16)])

    return distance


def _load_musiq(path: Path, device: str) -> Callable:
    try:
        import pyiqa
    except ImportError:
        raise _Skip("needs the `pyiqa` package, not in requirements.txt") from None
    _need(path / "musiq_koniq_ckpt.pth")
    import torch

    model = pyiqa.create_metric("musiq", device=device, pretrained_model_path=str(path / "musiq_koniq_ckpt.pth"))

    def score(frames: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)).flatten().cpu().numpy()

    return lambda frames: _batched(frames, score)


# -- a folder of videos -------------------------------------------------------------------------------------

def score_videos(methods: dict, num_segments: int = DEFAULT_SEGMENTS, extra: dict | None = None,
                 timeline_bins: int = 20, root: str | Path | None = None, progress: bool = True) -> dict:
    """Score every video of hiar.videoset.find_videos output; per video and the mean over each method's
    videos. Paths are written relative to `root` when given (a run folder stays movable)."""
    from tqdm import tqdm

    from hiar.video import read_video, video_fps

    result: dict = {"segments": num_segments, "metrics": {}, "methods": {},
                    "drift_score": {"weights": WEIGHTS, "floors": FLOORS, "definition": DRIFT_DEFINITION}}
    items = [v for videos in methods.values() for v in videos]
    for item in tqdm(items, desc="scoring videos", unit="video", disable=not progress):
        frames = read_video(item.path)
        fps = video_fps(item.path)
        if len(frames) < num_segments:
            raise ValueError(f"{item.path} has {len(frames)} frames, fewer than the {num_segments} segments")
        series = frame_series(frames, item.prompt, extra)
        drift = segment_drift(series, len(frames), num_segments, timeline_bins)
        path = Path(item.path).resolve()
        entry = {"path": str(path.relative_to(Path(root).resolve()) if root else path), "prompt": item.prompt,
                 "frames": len(frames), "fps": fps, "seconds": len(frames) / fps, **drift}
        result["methods"].setdefault(item.method, {"videos": {}})["videos"][item.name] = entry
        result["metrics"].update({name: {"unit": ALL_METRICS[name].unit, "description": ALL_METRICS[name].description,
                                         "higher_is_better": ALL_METRICS[name].higher_is_better}
                                  for name in series})
    for method in result["methods"].values():
        method["summary"] = summarise(list(method["videos"].values()))
    return result


def summarise(videos: list[dict]) -> dict:
    """Mean over videos of each per-segment value, slope, gap and the Drift Score (NaN-skipping)."""
    def mean(values):
        values = [v for v in values if v is not None and not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    names = sorted({n for v in videos for n in v["per_segment"]})
    out = {"videos": len(videos), "seconds": mean([v["seconds"] for v in videos]),
           "segment_time": videos[0]["segment_time"],
           "per_segment": {n: [mean([v["per_segment"][n][i] for v in videos if n in v["per_segment"]])
                               for i in range(len(videos[0]["segments"]))] for n in names},
           "slope": {n: mean([v["slope"].get(n) for v in videos]) for n in names},
           "gap": {n: mean([v["gap"].get(n) for v in videos]) for n in names},
           "drift_score": mean([v["drift_score"] for v in videos])}
    if all("timeline" in v and v["timeline_time"] == videos[0]["timeline_time"] for v in videos):
        out["timeline_time"] = videos[0]["timeline_time"]
        out["timeline"] = {n: [mean([v["timeline"][n][i] for v in videos if n in v["timeline"]])
                               for i in range(len(out["timeline_time"]))] for n in names}
    return out


DRIFT_DEFINITION = ("drift = sum_m w_m * |slope_m| / max(|first_m|, floor_m) / sum_m w_m over the measured metrics "
                    "with a weight; slope_m = least-squares slope of the per-segment means against the fraction of "
                    "the video (change from start to end); first_m = the metric's first-segment value")
