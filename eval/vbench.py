"""The VBench side of the evaluation: cut long videos into clips as VBench-Long does, and read VBench's
result JSON back into our report. VBench itself runs in its own environment (launch/vbench.sh).

    python -m eval.vbench clips --videos runs/eval/toy/videos --out runs/eval/toy/vbench/clips
    python -m eval.vbench read --clips runs/eval/toy/vbench/clips --results runs/eval/toy/vbench/results \
        --out runs/eval/toy/vbench/vbench.json

Clips (VBench-Long, vbench2_beta_long: split_video_into_clips): consecutive clips of --clip_seconds
(default 2 s) of frames; when frames remain, one more clip of full length ends at the last frame (it
overlaps the one before); a video shorter than a clip stays whole. Clip i of <method>/<stem>.mp4 is
<out>/<method>/<stem>_<iii>.mp4; each method folder gets prompts.json ({clip file: prompt}, VBench's
--prompt_file format for custom_input mode) and clips.json (where each clip comes from).

VBench writes <results>/<method>/<name>_eval_results.json as {dimension: [mean, [{"video_path": clip,
"video_results": score}, ...]]}; `read` averages each video's clips (VBench-Long averages them the same
way) and fits the same drift slope as hiar/drift.py through the clip scores against time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval import exit_code
from eval.drift import check_readable, videos_to_score
from hiar.atomic import atomic_path
from hiar.drift import fit_slope
from hiar.video import read_video, video_fps, write_video
from hiar.videoset import PROMPTS_FILE

CLIPS_FILE = "clips.json"
CLIP_SECONDS = 2.0  # VBench-Long's clip duration


def clip_bounds(num_frames: int, clip_frames: int) -> list[tuple[int, int]]:
    """[start, end) frames of VBench-Long's clips (module docstring)."""
    if clip_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {clip_frames}")
    if num_frames <= clip_frames:
        return [(0, num_frames)]
    bounds = [(i * clip_frames, (i + 1) * clip_frames) for i in range(num_frames // clip_frames)]
    if num_frames % clip_frames:
        bounds.append((num_frames - clip_frames, num_frames))
    return bounds


def write_clips(videos: str | Path, out: str | Path, clip_seconds: float = CLIP_SECONDS) -> dict:
    """Split every video of `videos` (hiar.videoset layouts) into clips under out/<method>/. The clips
    are derived files: a rerun (launch/vbench.sh) replaces them, each atomically."""
    if not clip_seconds > 0:
        raise ValueError(f"--clip_seconds={clip_seconds}: give a positive length (VBench-Long uses {CLIP_SECONDS:g})")
    methods, out = videos_to_score(videos), Path(out)
    check_readable(methods)
    written = {}
    for method, items in methods.items():
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        prompts, clips = {}, {}
        for item in tqdm(items, desc=f"clips ({method})", unit="video"):
            frames, fps = read_video(item.path), video_fps(item.path)
            for i, (a, b) in enumerate(clip_bounds(len(frames), round(clip_seconds * fps))):
                name = f"{item.name}_{i:03d}.mp4"
                write_video(folder / name, frames[a:b], fps)
                prompts[name] = item.prompt
                clips[name] = {"video": item.name, "clip": i, "start": a, "end": b, "frames": len(frames)}
        for name, listing in ((PROMPTS_FILE, prompts), (CLIPS_FILE, clips)):
            with atomic_path(folder / name) as tmp:
                tmp.write_text(json.dumps(listing, indent=1))
        written[method] = clips
    return written


def read_results(clips: str | Path, results: str | Path, clip_seconds: float | None = None) -> dict:
    """VBench's per-clip scores -> per video (mean and slope over its clips) and per method."""
    clips, results = Path(clips), Path(results)
    if not results.is_dir():
        raise ValueError(f"VBench results folder {results} does not exist: run launch/vbench.sh first")
    out: dict = {"clip_seconds": clip_seconds or CLIP_SECONDS, "dimensions": [], "methods": {}, "skipped": []}
    for method_dir in sorted(d for d in results.iterdir() if d.is_dir()):
        found = sorted(method_dir.glob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
        manifest_path = clips / method_dir.name / CLIPS_FILE
        if not found or not manifest_path.is_file():
            raise ValueError(f"{method_dir}: no *_eval_results.json, or no {manifest_path}")
        manifest, raw = _json(manifest_path), _json(found[-1])  # the newest run
        if not isinstance(raw, dict) or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[1], list)
                                                for v in raw.values()):
            raise ValueError(f"{found[-1]} is not VBench's {{dimension: [mean, [per clip]]}} result: point --results "
                             "at the folder launch/vbench.sh wrote")
        videos: dict = {}
        for dim, (_, per_clip) in raw.items():
            for entry in per_clip:
                score = entry.get("video_results") if isinstance(entry, dict) else None
                if isinstance(score, bool):
                    score = float(score)  # dynamic_degree: is the clip dynamic
                if not isinstance(score, (int, float)) or Path(str(entry.get("video_path"))).name not in manifest:
                    out["skipped"].append(f"{method_dir.name}/{dim}: {str(entry)[:80]}")
                    continue
                clip = manifest[Path(entry["video_path"]).name]
                videos.setdefault(clip["video"], {}).setdefault(dim, []).append((clip, float(score)))
            if dim not in out["dimensions"]:
                out["dimensions"].append(dim)
        per_video = {}
        for name, dims in videos.items():
            per_video[name] = {}
            for dim, scored in dims.items():
                scored.sort(key=lambda cs: cs[0]["clip"])
                t = np.array([(c["start"] + c["end"]) / 2 / c["frames"] for c, _ in scored])  # fraction of video
                y = np.array([s for _, s in scored])
                per_video[name][dim] = {"clips": y.tolist(), "clip_time": t.tolist(), "mean": float(y.mean()),
                                        "slope": fit_slope(t, y) if len(y) > 1 else math.nan}
        summary = {dim: {k: _nanmean([v[dim][k] for v in per_video.values() if dim in v]) for k in ("mean", "slope")}
                   for dim in out["dimensions"]}
        out["methods"][method_dir.name] = {"videos": per_video, "summary": summary, "source": str(found[-1])}
    if not out["methods"]:
        raise ValueError(f"no method folders with results in {results}")
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): run that step of launch/vbench.sh again") from None


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clips", help="split videos into VBench-Long clips")
    c.add_argument("--videos", required=True, help="folder of *.mp4 or <method>/*.mp4")
    c.add_argument("--out", required=True, help="clip folder (one subfolder a method)")
    c.add_argument("--clip_seconds", type=float, default=CLIP_SECONDS)
    r = sub.add_parser("read", help="VBench result JSON -> vbench.json for eval.report")
    r.add_argument("--clips", required=True, help="the clip folder `clips` wrote")
    r.add_argument("--results", required=True, help="VBench output folder, one subfolder a method")
    r.add_argument("--out", required=True, help="vbench.json to write")
    r.add_argument("--clip_seconds", type=float, default=CLIP_SECONDS)
    args = p.parse_args(argv)

    def work() -> None:
        if args.command == "clips":
            written = write_clips(args.videos, args.out, args.clip_seconds)
            print(f"wrote {sum(len(c) for c in written.values())} clips of {args.clip_seconds:g} s to {args.out}")
            return
        result = read_results(args.clips, args.results, args.clip_seconds)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        for method, v in result["methods"].items():
            print(method + ": " + ", ".join(f"{d} {s['mean']:.4f} (slope {s['slope']:+.4f})"
                                            for d, s in v["summary"].items()))
        print(f"wrote {args.out}")

    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
