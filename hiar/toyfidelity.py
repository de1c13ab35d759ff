"""Does a toy model draw what its captions say? Held-out clips captioned, sampled by a checkpoint, and
every prompted object measured against the caption (eval.toy_fidelity).

What is measured, per prompted object (the caption's spec, `hiar.captions.parse_caption`), from the
frames alone: its colour (seen in at least half of the frames), its shape (`hiar.toyworld.classify_shape`
of its pixels, the majority over the frames it is seen in), its direction (the world's bouncing motion
fitted to its centroid track, `fit_motion`), its speed, and its presence over time (the fraction of
frames it is seen in, overall and by segment); per clip the background and the count of objects. The
same held-out clips are captioned in two sets, the template and the held-out phrasings
(`hiar.captions`), and reported separately.

Samplers: "codec", no model, the held-out clips themselves through the checkpoint's codec (the ceiling
every model is measured against, with its PSNR); "teacher", the bidirectional teacher's ODE with CFG
(`hiar.toyteacher`); "student", the causal student in its config's order, one video of the config's
length or of `seconds`. And without a model, a set of teacher ODE trajectories' clean ends against
their own captions (`trajectory_fidelity`): what the ODE initialisation is taught to draw.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hiar.atomic import atomic_path
from hiar.captions import parse_caption, phrase
from hiar.checkpoints import checkpoint_config, load_generator
from hiar.codecs import Codec, build_codec, rendered_frames
from hiar.config import Config, with_overrides
from hiar.sampling import block_noise, sample_video
from hiar.text import build_text_encoder
from hiar.toyteacher import encode_clips, teacher_samples
from hiar.toyworld import (DIRECTIONS, SPEED_RANGE, UNIT_AREA, MeasuredObject, Motion, ToyClip, caption_fidelity,
                           fidelity_verdict, measure_frame, sample_clip, speed_census, torus_offset)
from hiar.trajectories import TrajectoryStore
from hiar.video import to_uint8

HELD_OUT_SEED = 424242  # captions of clips the teacher never trained on
# The evaluation's two sets of clips, each (world seed, noise seed): "test", the clips every result is
# reported on; "validation", other clips and other noise, on which a run's checkpoint is chosen
# (eval.toy_select), so that the choice is not scored on the clips that chose it. No stage trains on
# either world seed (training draws its clips from train.seed, small integers; eval.toy_results' long
# videos from 515151).
CLIP_SETS = {"test": (HELD_OUT_SEED, 0), "validation": (616161, 1)}
SAMPLERS = ("student", "teacher", "codec")
CAPTION_SETS = ("template", "held_out")  # the sets every result reports
# and the training's varied phrasings of the same held-out scenes, on request: whether a model draws less for a
# held-out phrasing than for a phrasing of the kind it trained on, or for the template than for either
CAPTION_CHOICES = CAPTION_SETS + ("varied",)
SEGMENTS = 5  # presence and axis of motion by fifth of the video
COUNT_CORE = 3  # px of core (hiar.toyworld.core_area) from which an object colour counts as an object: the
# rims a blurred border leaves in a blended colour have none (measured on codec round trips), so they are
# not counted
DIRECTION_FRAMES = 24  # the direction is read from the start of the video, where the caption says it
MIN_TRACK = 3  # frames an object must be seen in for its motion to be read


# -- motion --------------------------------------------------------------------------------------------------


def _bounced(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The world's border bounce (hiar.toyworld) for any positions p: a triangle wave between lo and hi."""
    span = max(hi - lo, 1e-6)
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def fit_motion(times: np.ndarray, positions: np.ndarray, lo: float, hi: float,
               motion: Motion = "bounce") -> tuple[float, float]:
    """(signed speed px/frame, mean absolute residual px) of the world's motion along one axis,
    p(t) = bounce(p0 + v t) between lo and hi, or with `motion` "wrap" p(t) = p0 + v t modulo hi - lo (distances
    on the circle), that fits a centroid track best (least absolute error, on a grid of p0 every half
    pixel and v every 0.05 px a frame up to 3, so a jittery track's outliers do not decide). Bounces and
    wraps are part of the model: an object that meets the border and comes back, or comes in on the other
    side, still moves the way it started."""
    p0 = np.arange(lo, hi + 0.25, 0.5, dtype=np.float32)[:, None, None]  # [P, 1, 1]
    v = np.arange(-3.0, 3.0001, 0.05, dtype=np.float32)[None, :, None]  # [1, V, 1]
    t = (times - times[0]).astype(np.float32)[None, None]  # [1, 1, T]
    positions = positions.astype(np.float32)[None, None]
    if motion == "wrap":
        cost = np.abs(torus_offset(p0 + v * t - positions, hi - lo)).mean(-1)  # [P, V]
    else:
        cost = np.abs(_bounced(p0 + v * t, lo, hi) - positions).mean(-1)
    i, j = np.unravel_index(int(cost.argmin()), cost.shape)
    return float(v[0, j, 0]), float(cost[i, j])


def object_motion(track: list[tuple[float, float] | None], half_extent: float, shape: str | None,
                  height: int, width: int, motion: Motion = "bounce") -> dict:
    """Direction ('left', ... or None: seen in fewer than MIN_TRACK frames), signed speeds and residual of one
    track (centroid a frame, None where unseen) of an object of this half-extent and shape, in the world
    of this `motion`."""
    seen = [(t, c) for t, c in enumerate(track) if c is not None]
    if len(seen) < MIN_TRACK:
        return {"direction": None, "vx": math.nan, "vy": math.nan, "residual": math.nan}
    times = np.array([t for t, _ in seen], np.float32)
    xy = np.array([c for _, c in seen], np.float32)
    dy = half_extent / 3 if shape == "triangle" else 0.0  # the triangle's centroid sits below its box centre
    if motion == "wrap":  # no margins: the centroid goes all the way round
        vx, rx = fit_motion(times, xy[:, 0], 0, width, motion)
        vy, ry = fit_motion(times, xy[:, 1], 0, height, motion)
    else:
        vx, rx = fit_motion(times, xy[:, 0], half_extent, width - half_extent)
        vy, ry = fit_motion(times, xy[:, 1], half_extent + dy, height - half_extent + dy)
    unit = (np.sign(vx), 0.0) if abs(vx) >= abs(vy) else (0.0, np.sign(vy))
    direction = next((name for name, d in DIRECTIONS.items() if d == unit), None)  # None: no motion at all
    return {"direction": direction, "vx": vx, "vy": vy, "residual": max(rx, ry)}


def _segments(n: int, segments: int) -> list[range]:
    edges = np.linspace(0, n, segments + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges, edges[1:])]


# -- one video against its caption ---------------------------------------------------------------------------


def prompt_fidelity(frames: np.ndarray, caption: str, segments: int = SEGMENTS,
                    motion: Motion = "bounce") -> dict:
    """What a video (uint8 [F, H, W, 3]) of the world with this `motion` rule shows of each object
    its caption prompts (`object_fidelity` under "prompted"). Per clip: background_ok, count (the median
    over frames of objects with a core of at least COUNT_CORE px) and count_ok, and `caption_fidelity`'s
    measures and verdict (the columns of eval.toy_results)."""
    wanted = parse_caption(caption)
    if wanted is None:
        raise ValueError(f"not a toy-world caption: {caption!r}")
    measured = [measure_frame(f, shapes=True, motion=motion) for f in frames]
    parts = _segments(len(frames), segments)
    objects = []
    for o in wanted["objects"]:
        seen = [next((m for m in frame.objects if m.colour == o["colour"]), None) for frame in measured]
        objects.append(object_fidelity(o, seen, parts, frames.shape[1], frames.shape[2], motion))
    count = int(np.median([sum(m.core >= COUNT_CORE for m in frame.objects) for frame in measured]))
    legacy = caption_fidelity(frames, caption, measured, motion)
    return {"caption": caption, "background_ok": legacy["background"] >= 0.5, "count": count,
            "count_ok": count == len(wanted["objects"]), "prompted": objects, **legacy, **fidelity_verdict(legacy)}


def object_fidelity(wanted: dict, seen: list[MeasuredObject | None], parts: list[range], height: int,
                    width: int, motion: Motion = "bounce") -> dict:
    """One prompted object ({colour, shape, direction}) against its measurements, frame by frame (None
    where its colour is not seen).

    colour_ok: seen in at least half the frames; presence: the fraction of frames it is seen in, overall
    and by part; shape: the majority of its frames' shapes (None: no recognisable shape), shape_ok,
    shape_iou (median overlap with the best-fitting shape); direction: `object_motion` over the first
    DIRECTION_FRAMES frames, direction_ok; speed (fitted, px a frame) and moves (within the world's
    SPEED_RANGE); axis_ok_by_segment: each part's motion lies along the prompted axis at the world's
    speeds (after a bounce the sense reverses, the axis does not); direction_ok_by_segment: each part's
    motion is the prompted direction at the world's speeds (what a caption promises for the whole video
    in the world that wraps, and only until the first bounce in the one that bounces); both None for a
    part of fewer than MIN_TRACK frames. `motion`: the world's rule at a border.
    """
    found = [m for m in seen if m is not None]
    present = np.array([m is not None for m in seen])
    votes = Counter(m.shape for m in found)
    shape = votes.most_common(1)[0][0] if votes else None
    # the bounce margins: the half-extent of its area as the shape it shows (else as the prompted one)
    area = float(np.median([m.area for m in found])) if found else 0.0
    half = math.sqrt(area / UNIT_AREA[shape or wanted["shape"]])
    track = [m.centroid if m is not None else None for m in seen]
    start = object_motion(track[:DIRECTION_FRAMES], half, shape, height, width, motion)
    speed = math.hypot(start["vx"], start["vy"])
    horizontal = wanted["direction"] in ("left", "right")
    axes, senses = [], []
    for part in parts:
        if len(part) < MIN_TRACK:  # too short a part to read a motion from: not judged (None)
            axes.append(None)
            senses.append(None)
            continue
        m = object_motion([track[t] for t in part], half, shape, height, width, motion)
        at_speed = SPEED_RANGE[0] <= max(abs(m["vx"]), abs(m["vy"])) <= SPEED_RANGE[1]
        axes.append(bool(m["direction"] is not None and (abs(m["vx"]) >= abs(m["vy"])) == horizontal and at_speed))
        senses.append(bool(m["direction"] == wanted["direction"] and at_speed))
    return {**wanted, "colour_ok": bool(present.mean() >= 0.5), "presence": float(present.mean()),
            "presence_by_segment": [float(present[part.start:part.stop].mean()) for part in parts],
            "shape_measured": shape, "shape_ok": shape == wanted["shape"],
            "shape_votes": {str(k): v for k, v in votes.items()},
            "shape_iou": float(np.median([m.shape_iou for m in found])) if found else 0.0,
            "direction_measured": start["direction"], "direction_ok": start["direction"] == wanted["direction"],
            "speed": speed, "moves": bool(SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]),
            "motion_residual": start["residual"], "axis_ok_by_segment": axes, "direction_ok_by_segment": senses}


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else math.nan


def _by_segment(objects: list[dict], key: str) -> list[float]:
    """The mean over objects of a per-part measure, part by part (NaN for a part none was judged in)."""
    return [_rate([o[key][i] for o in objects if o[key][i] is not None])
            for i in range(len(objects[0][key]))] if objects else []


def direction_by_scene(clips: list[dict]) -> dict:
    """The direction of moving objects by what the caption asks of them: a lone object, two that go the same
    way, two that go different ways (`two_ways`); and of the wrong ones among those last, the share that went
    the other object's way (`other_objects_way`, 1/3 by chance): a model that hears the directions but not
    whose each is moves both objects alike."""
    lone, same, two_ways, other_way = [], [], [], []
    for c in clips:
        prompted = c["prompted"]
        if len(prompted) == 1:
            lone += [o["direction_ok"] for o in prompted if o["moves"]]
            continue
        for o, other in zip(prompted, reversed(prompted)):  # the toy world's scenes hold one or two objects
            if not o["moves"]:
                continue
            if o["direction"] == other["direction"]:
                same.append(o["direction_ok"])
                continue
            two_ways.append(o["direction_ok"])
            if not o["direction_ok"]:
                other_way.append(o["direction_measured"] == other["direction"])
    return {"one_object": _rate(lone), "two_same_way": _rate(same), "two_ways": _rate(two_ways),
            "other_objects_way": _rate(other_way)}


def summarise(clips: list[dict]) -> dict:
    """The fractions a table reports, over the prompted objects (colour, shape, direction, presence) or
    the clips (background, count, and `fidelity_verdict`'s colour_fidelity and moving)."""
    objects = [o for c in clips for o in c["prompted"]]
    seen = [o for o in objects if o["colour_ok"]]
    moving = [o for o in objects if o["moves"]]
    return {"clips": len(clips), "objects": len(objects),
            "colour": _rate([o["colour_ok"] for o in objects]),
            "shape": _rate([o["shape_ok"] for o in objects]),
            "shape_of_seen": _rate([o["shape_ok"] for o in seen]),
            "shape_iou": _rate([o["shape_iou"] for o in seen]),
            "direction": _rate([o["direction_ok"] for o in objects]),
            "direction_of_moving": _rate([o["direction_ok"] for o in moving]),
            "direction_by_scene": direction_by_scene(clips),
            "moving_objects": _rate([o["moves"] for o in objects]),
            "axis_by_segment": _by_segment(objects, "axis_ok_by_segment"),
            "direction_by_segment": _by_segment(objects, "direction_ok_by_segment"),
            "presence": _rate([o["presence"] for o in objects]),
            "presence_by_segment": _by_segment(objects, "presence_by_segment"),
            "background": _rate([c["background_ok"] for c in clips]),
            "count": _rate([c["count_ok"] for c in clips]),
            "colour_fidelity": _rate([c["colours_ok"] for c in clips]),
            "moving": _rate([c["moves"] for c in clips]),
            "object_speeds": speed_census([s for c in clips for s in c["speed"].values()])}


def psnr(reference: np.ndarray, video: np.ndarray) -> float:
    """PSNR (dB) of a video against its reference, both uint8 [F, H, W, 3], over all their pixels."""
    mse = float(np.mean((reference.astype(np.float64) - video.astype(np.float64)) ** 2))
    return 10 * math.log10(255 ** 2 / mse) if mse > 0 else math.inf


# -- sampling -------------------------------------------------------------------------------------------------


def held_out_clips(num_clips: int, height: int = 64, width: int = 64, speed: float | None = None,
                   motion: Motion = "bounce", split: str = "test") -> list[ToyClip]:
    """The evaluation's clips (`split`: one of CLIP_SETS) in the world with this `motion` rule; with
    `speed`, every object moves at that many px a frame instead of its own (a codec's round trip at one
    speed: how much motion within a latent frame costs it)."""
    seed = CLIP_SETS[split][0]
    clips = [sample_clip(seed, i, height, width, motion=motion) for i in range(num_clips)]
    if speed is None:
        return clips
    return [dataclasses.replace(c, objects=tuple(dataclasses.replace(o, speed=speed) for o in c.objects))
            for c in clips]


def captions_of(clips: list[ToyClip], caption_set: str, split: str = "test") -> list[str]:
    """The clips' captions in `caption_set` (a style of hiar.captions), keyed by their index in `split`."""
    seed = CLIP_SETS[split][0]
    return [phrase(clip.spec(), caption_set, f"{seed}/{i}") for i, clip in enumerate(clips)]


def evaluation_config(checkpoint: str, overrides: list[str], seconds: float | None) -> Config:
    """The checkpoint's own config with `overrides`, lengthened to at least `seconds` of video."""
    cfg = with_overrides(checkpoint_config(checkpoint), overrides)
    if seconds is None:
        return cfg
    v = cfg.video
    frames = math.ceil((seconds * v.fps - 1) / v.vae_stride[0]) + 1
    latent = math.ceil(frames / v.frames_per_block) * v.frames_per_block  # whole blocks
    return with_overrides(cfg, [f"video.num_latent_frames={latent}"])


class Sampler:
    """A checkpoint's model, codec and text encoder, sampling videos (uint8 [F, H, W, 3]) of captions."""

    def __init__(self, checkpoint: str, cfg: Config, sampler: str, context: int = 0, use_ema: bool = False,
                 noise_seed: int = 0):
        self.model, self.cfg = load_generator(checkpoint, cfg, use_ema)
        self.model.eval()
        self.sampler, self.codec, self.encoder = sampler, build_codec(self.cfg), build_text_encoder(self.cfg)
        self.context = context  # teacher: latent frames of each clip given, the rest drawn
        self.noise_seed = noise_seed  # student: the seed of its cell noise (CLIP_SETS)

    def videos(self, clips: list[ToyClip], captions: list[str], batch_size: int) -> list[np.ndarray]:
        negative = self.encoder([self.cfg.train.negative_prompt])
        videos = []
        for start in range(0, len(captions), batch_size):
            text = self.encoder(captions[start:start + batch_size])
            x0 = self.latents(clips[start:start + batch_size], text, negative, start)
            videos += [to_uint8(v) for v in self.codec.decode(x0)]
        return videos

    def latents(self, clips: list[ToyClip], text: torch.Tensor, negative: torch.Tensor, start: int) -> torch.Tensor:
        """The clean latents of one batch of clips, the first of them held-out clip `start`."""
        cfg = self.cfg
        if self.sampler == "codec":
            return encode_clips(self.codec, clips, rendered_frames(cfg))
        if self.sampler == "teacher":
            given = encode_clips(self.codec, clips, rendered_frames(cfg))[:, :self.context] if self.context else None
            return teacher_samples(self.model, cfg, text, negative, seed=start, context=given)
        with torch.no_grad():
            noise = block_noise(cfg, self.noise_seed, range(start, start + len(text)))
            return sample_video(self.model, text, cfg, noise, cfg.geometry.num_blocks)


def round_trip(codec: Codec, clips: list[ToyClip], frames: int, caption_set: str = "template") -> dict:
    """Rendered clips of `frames` frames through any codec and back, measured against their captions: the
    ceiling of a model on that codec (`summarise` and the mean PSNR)."""
    back = [to_uint8(v) for v in codec.decode(encode_clips(codec, clips, frames))]
    per_clip = [prompt_fidelity(v, c, motion=clip.motion)
                for v, c, clip in zip(back, captions_of(clips, caption_set), clips)]
    return {**summarise(per_clip), "psnr": float(np.mean([psnr(c.render(frames), v) for c, v in zip(clips, back)]))}


def evaluate(checkpoint: str, overrides: list[str], sampler: str, num_clips: int, batch_size: int,
             caption_sets: list[str], seconds: float | None = None, speed: float | None = None,
             context: int = 0, use_ema: bool = False, split: str = "test") -> tuple[dict, list[np.ndarray]]:
    """Every caption set's per-clip measures and summary (`by_captions`); the first set's summary at the
    top level, as eval.toy_results reads it; the codec's PSNR against the rendered clips; and the first
    set's videos. The codec sampler's videos do not depend on the caption, so it samples once; it alone
    takes a `speed` for every object (`held_out_clips`), since a model draws from the caption only. With
    `context` the teacher is given each held-out clip's first `context` latent frames, rendered and
    encoded, and draws the rest: where the objects start is the clip's, where they go is the model's.
    `checkpoint` may be a training checkpoint's model.pt: its generator, or with `use_ema` its EMA. `split`
    (CLIP_SETS): the test clips, or the validation clips a checkpoint is chosen on (the student's and the
    codec's only: the teacher draws its noise from the clip's index)."""
    if split not in CLIP_SETS or (split != "test" and sampler == "teacher"):
        raise ValueError(f"--split {split}: one of {', '.join(CLIP_SETS)}; the teacher sampler samples the test clips")
    if sampler == "teacher" and seconds is not None:
        raise ValueError("--seconds: the teacher is bidirectional and samples clips of its training length only")
    if speed is not None and (sampler != "codec" or speed < 0):
        raise ValueError(f"--speed {speed}: a speed of at least 0 px a frame, for the codec sampler only (a model "
                         "draws from the caption, which says no speed)")
    cfg = evaluation_config(checkpoint, overrides, seconds)
    if context and not (sampler == "teacher" and 0 < context < cfg.video.num_latent_frames):
        raise ValueError(f"--context {context}: the teacher sampler only, and fewer latent frames than its clips' "
                         f"{cfg.video.num_latent_frames}")
    model = Sampler(checkpoint, cfg, sampler, context, use_ema, noise_seed=CLIP_SETS[split][1])
    v = model.cfg.video
    clips = held_out_clips(num_clips, v.height, v.width, speed, v.toy_motion, split)
    result: dict = {"frames": rendered_frames(model.cfg), "fps": model.cfg.video.fps, "by_captions": {}}
    first = None
    for caption_set in caption_sets:
        captions = captions_of(clips, caption_set, split)
        videos = first if sampler == "codec" and first is not None else model.videos(clips, captions, batch_size)
        first = first if first is not None else videos
        per_clip = [prompt_fidelity(video, c, motion=v.toy_motion) for video, c in zip(videos, captions)]
        result["by_captions"][caption_set] = {**summarise(per_clip), "per_clip": per_clip}
    if sampler == "codec":
        frames = rendered_frames(model.cfg)
        result["psnr"] = float(np.mean([psnr(clip.render(frames), v) for clip, v in zip(clips, first)]))
    top = result["by_captions"][caption_sets[0]]
    result |= {"clips": top["clips"], "colour_fidelity": top["colour_fidelity"], "moving": top["moving"],
               "object_speeds": top["object_speeds"]}
    return result, first


def trajectory_fidelity(folder: str | Path, cfg: Config, limit: int) -> tuple[dict, list[np.ndarray]]:
    """The first `limit` trajectories of a set (train/ode_pairs.py's folder) decoded with `cfg`'s codec and
    measured against their own captions, the training captions: the data the ODE initialisation regresses,
    so a student that draws less than these lost it in the regression or in its sampling, not in its data.
    `summarise` with the per-clip measures, and the videos."""
    store, codec = TrajectoryStore(folder), build_codec(cfg)
    per_clip, videos = [], []
    for i in range(min(limit, len(store))):
        trajectory = store[i]
        video = to_uint8(codec.decode(trajectory["final"][None])[0])
        per_clip.append(prompt_fidelity(video, trajectory["caption"], motion=cfg.video.toy_motion))
        videos += [video] if len(videos) < 8 else []  # the contact sheet's
    return {**summarise(per_clip), "per_clip": per_clip}, videos


def write_fidelity(out: Path, result: dict, videos: list[np.ndarray]) -> None:
    """out/results.json and out/contact_sheet.png (six frames of each of the first eight videos)."""
    import imageio.v3 as iio

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    sheet = np.concatenate([np.concatenate(list(v[:: max(1, len(v) // 6)][:6]), axis=1) for v in videos[:8]], axis=0)
    with atomic_path(out / "contact_sheet.png") as tmp:
        iio.imwrite(tmp, sheet, extension=".png")


# -- comparing two models on the same clips --------------------------------------------------------------------

COMPARED = {  # what `paired_difference` compares, read from a `summarise` of the clips
    "colour": lambda s: s["colour"], "shape": lambda s: s["shape"],
    "direction_of_moving": lambda s: s["direction_of_moving"],
    "direction_two_ways": lambda s: s["direction_by_scene"]["two_ways"], "count": lambda s: s["count"],
    "presence": lambda s: s["presence"], "presence_last_fifth": lambda s: s["presence_by_segment"][-1],
}


def question(overrides: list[str], seconds: float | None = None, sampler: str = "student", use_ema: bool = False,
             context: int = 0, speed: float | None = None, split: str = "test") -> dict:
    """What a fidelity measurement asks of its checkpoint (`evaluate`'s settings), as its results.json
    records it and `measured` compares it."""
    return {"overrides": overrides, "seconds": seconds, "sampler": sampler, "use_ema": use_ema, "context": context,
            "speed": speed, "split": split}


def measured(results: Path, checkpoint: Path, clips: int, **question) -> bool:
    """Whether an eval.toy_fidelity results.json (written atomically, so whole or absent) is what a rerun
    would measure: of the same checkpoint, not retrained since, with `clips` clips in each of CAPTION_SETS,
    and every entry of `question` (`question()`) as recorded."""
    if not results.is_file() or results.stat().st_mtime < checkpoint.stat().st_mtime:
        return False
    try:
        r = json.loads(results.read_text())
    except ValueError:  # not ours, or damaged: measured again
        return False
    recorded = {"split": "test", **r}  # records from before --split measured the test clips
    return (recorded.get("checkpoint") == str(checkpoint) and all(recorded.get(k) == v for k, v in question.items())
            and list(r.get("by_captions", {})) == list(CAPTION_SETS)
            and all(s.get("clips") == clips for s in r["by_captions"].values()))


def paired_difference(a: list[dict], b: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """B - A on each `COMPARED` measure of two evaluations' `per_clip` over the same held-out clips, with
    a 95% interval from resampling the clips (the same draw for both: clips differ far more from one
    another than two models do on one clip, so pairing them narrows the interval several times over
    two independent samples). Objects within a clip are not independent (one bad clip loses both), so
    the clip is what is resampled. {measure: {a, b, difference, low, high}}."""
    if [c["caption"] for c in a] != [c["caption"] for c in b]:
        raise ValueError("the two evaluations are not of the same clips (their captions differ): compare "
                         "runs of eval.toy_fidelity with the same --num_clips and --captions")
    whole_a, whole_b = summarise(a), summarise(b)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in COMPARED}
    for _ in range(resamples):
        pick = rng.integers(len(a), size=len(a))
        s_a, s_b = summarise([a[i] for i in pick]), summarise([b[i] for i in pick])
        for name, read in COMPARED.items():
            draws[name].append(read(s_b) - read(s_a))
    out = {}
    for name, read in COMPARED.items():
        d = np.asarray(draws[name])
        d = d[~np.isnan(d)]  # a resample with no moving object in one of them
        low, high = np.quantile(d, [0.025, 0.975]) if len(d) else (math.nan, math.nan)
        out[name] = {"a": read(whole_a), "b": read(whole_b), "difference": read(whole_b) - read(whole_a),
                     "low": float(low), "high": float(high)}
    return out
