"""Reference videos for the evaluation harness: toy-world clips rendered from their ground truth, and
the same clips with a known, synthetic drift, in the layout eval.drift reads.

    python -m eval.toy_videos --out runs/eval/toy/videos --num_videos 4 --seconds 10

Writes <out>/truth/*.mp4 (perfect: every drift slope is ~0 and toy fidelity is exact) and
<out>/faded/*.mp4 (each frame blended towards grey by a weight rising linearly from 0 to --fade over the
video: saturation, colourfulness and toy colour errors drift by a known amount), each with prompts.json.
Files that exist already stop it before anything is written, unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hiar.outputs import OVERWRITE_HELP, exit_code, new_file, refuse_existing
from hiar.toyworld import sample_clip
from hiar.video import write_video

SEED = 777  # clips of the toy world used only here


def faded(frames: np.ndarray, fade: float) -> np.ndarray:
    """Blend frame t towards mid-grey (128) with weight fade * t / (F - 1): uint8 [F, H, W, 3]."""
    w = (fade * np.arange(len(frames)) / max(len(frames) - 1, 1))[:, None, None, None]
    return ((1 - w) * frames + w * 128.0).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for truth/ and faded/")
    p.add_argument("--num_videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="height and width in pixels")
    p.add_argument("--fade", type=float, default=0.5, help="grey weight reached at the last frame of faded/")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    num_frames = round(args.seconds * args.fps)
    if args.num_videos < 1 or num_frames < 2 or not 0 <= args.fade <= 1:
        print("error: need --num_videos >= 1, --seconds * --fps >= 2 and 0 <= --fade <= 1", file=sys.stderr)
        return 2
    return exit_code(lambda: write_references(Path(args.out), args, num_frames))


def write_references(out: Path, args: argparse.Namespace, num_frames: int) -> None:
    methods = (("truth", 0.0), ("faded", args.fade))
    names = [f"{i:03d}-0.mp4" for i in range(args.num_videos)]
    refuse_existing([out / m / n for m, _ in methods for n in [*names, "prompts.json"]], args.overwrite)
    for method, fade in methods:
        prompts = {}
        for i, name in enumerate(names):
            clip = sample_clip(SEED, i, args.size, args.size)
            with new_file(out / method / name, args.overwrite) as tmp:
                write_video(tmp, faded(clip.render(num_frames), fade), args.fps)
            prompts[name] = clip.caption
        with new_file(out / method / "prompts.json", args.overwrite) as tmp:
            tmp.write_text(json.dumps(prompts, indent=1))
    print(f"wrote {args.num_videos} videos of {num_frames} frames to {out / 'truth'} and {out / 'faded'}")


if __name__ == "__main__":
    sys.exit(main())
