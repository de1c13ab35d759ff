"""Score a folder of videos for drift: per video, per segment, per metric; slopes, first-to-last gaps and
the Drift Score (definition in hiar/drift.py and docs/evaluation.md).

    python -m eval.drift --videos runs/eval/toy/videos --out runs/eval/toy/scores.json

--videos holds *.mp4 (one method) or <method>/*.mp4. Metrics that need weights (DINOv2, CLIP-IQA, LPIPS,
MUSIQ) run only with --weights pointing at a local folder; each one skipped says so in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import exit_code
from hiar.atomic import atomic_path
from hiar.drift import DEFAULT_SEGMENTS, load_weighted_metrics, score_videos
from hiar.videoset import find_videos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of *.mp4, or of <method>/*.mp4")
    p.add_argument("--out", required=True, help="scores JSON to write")
    p.add_argument("--segments", type=int, default=DEFAULT_SEGMENTS, help="equal segments a video is split into")
    p.add_argument("--timeline_bins", type=int, default=20, help="finer bins kept for the plots")
    p.add_argument("--weights", help="local folder with dinov2/, clip/, lpips/, musiq/ (optional)")
    p.add_argument("--device", default="cpu", help="device of the weighted metrics")
    return p.parse_args(argv)


def write_scores(videos: str, out: str, segments: int, timeline_bins: int, weights: str | None,
                 device: str) -> dict:
    """Check the inputs, score, write `out` atomically; ValueError before any compute on bad input."""
    if segments < 2:
        raise ValueError(f"--segments={segments}: a slope needs at least 2 segments")
    methods = find_videos(videos)
    extra, notices = load_weighted_metrics(weights, device)
    for notice in notices:
        print(notice, file=sys.stderr)
    scores = score_videos(methods, segments, extra, timeline_bins, root=Path(out).parent)
    scores["skipped"] = notices
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(scores, indent=1))
    for name, method in scores["methods"].items():
        s = method["summary"]
        print(f"{name}: {s['videos']} videos, {s['seconds']:.1f} s, drift score {s['drift_score']:.4f}")
    print(f"wrote {out}")
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: write_scores(args.videos, args.out, args.segments, args.timeline_bins, args.weights,
                                          args.device))


if __name__ == "__main__":
    sys.exit(main())
