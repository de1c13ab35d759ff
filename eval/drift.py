"""Score a folder of videos for drift: per video, per segment, per metric; slopes, first-to-last gaps and
the Drift Score (definition in hiar/drift.py and docs/evaluation.md; the scoring: hiar/scoring.py).

    python -m eval.drift --videos runs/eval/toy/videos --out runs/eval/toy/scores.json

--videos holds *.mp4 (one method) or <method>/*.mp4. Metrics that need weights (DINOv2, CLIP-IQA, LPIPS,
MUSIQ) run only with --weights pointing at a local folder; each one skipped says so in one line.
--out can be anywhere: video paths in it are relative to its folder when the videos lie under that
folder (a run folder moves as a whole), absolute otherwise. An existing --out is replaced only with
--overwrite; every video's header is read before scoring starts, so a stray file stops the run at once.
"""

from __future__ import annotations

import argparse
import sys

from hiar.drift import DEFAULT_SEGMENTS
from hiar.outputs import OVERWRITE_HELP, exit_code
from hiar.scoring import write_scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of *.mp4, or of <method>/*.mp4")
    p.add_argument("--out", required=True, help="scores JSON to write")
    p.add_argument("--segments", type=int, default=DEFAULT_SEGMENTS, help="equal segments a video is split into")
    p.add_argument("--timeline_bins", type=int, default=20, help="finer bins kept for the plots")
    p.add_argument("--weights", help="local folder with dinov2/, clip/, lpips/, musiq/ (optional)")
    p.add_argument("--device", default="cpu", help="device of the weighted metrics")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: write_scores(args.videos, args.out, args.segments, args.timeline_bins, args.weights,
                                          args.device, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
