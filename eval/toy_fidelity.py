"""Does a toy model draw what its captions say? Samples held-out captions and measures every frame.

    python -m eval.toy_fidelity --checkpoint runs/toy/teacher/model.safetensors --sampler teacher --out docs/toy_teacher
    python -m eval.toy_fidelity --checkpoint runs/toy/hiar/model.safetensors --out runs/toy/hiar/fidelity
    python -m eval.toy_fidelity --checkpoint runs/toy/self_forcing/model.safetensors sampling.method=frame_first

`--sampler codec`: no model, the held-out clips themselves through the toy codec (of the checkpoint's
config): the ceiling every model is measured against. `--sampler teacher`: the bidirectional teacher's
ODE with CFG (train.sample_steps, train.sample_shift, train.guidance_scale of the checkpoint's config).
`--sampler student` (default): the causal student in its config's order (trailing section.key=value
overrides change it), one video of the config's length. A clip passes colour fidelity and moves as
`hiar.toyworld.fidelity_verdict` says (the measuring: hiar/toyfidelity.py). Writes results.json and
contact_sheet.png (six frames of the first eight clips). A missing checkpoint or a bad override ends it
with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hiar.checkpoints import CheckpointError
from hiar.config import ConfigError
from hiar.toyfidelity import SAMPLERS, fidelity, sample_held_out, write_fidelity


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/teacher/model.safetensors")
    p.add_argument("--num_clips", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sampler", choices=SAMPLERS, default="student")
    p.add_argument("--out", default="runs/toy/fidelity")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (student sampler)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist: train it first (launch/reproduce_toy.sh) or "
                         "give another")
    if args.num_clips < 1 or args.batch_size < 1:
        raise ValueError("--num_clips and --batch_size must be at least 1")
    captions, videos = sample_held_out(args.checkpoint, args.overrides, args.sampler, args.num_clips, args.batch_size)
    result = {"checkpoint": args.checkpoint, "sampler": args.sampler, "overrides": args.overrides,
              **fidelity(captions, videos)}
    out = Path(args.out)
    write_fidelity(out, result, videos)
    census = ", ".join(f"{k} {v:.0%}" for k, v in result["object_speeds"].items())
    print(f"colour fidelity {result['colour_fidelity']:.0%}, moving {result['moving']:.0%} of {len(captions)} clips "
          f"(objects' speeds: {census}); wrote {out / 'results.json'} and {out / 'contact_sheet.png'}")
    return result


def cli(argv=None) -> int:
    """main() as a program: bad input is one 'error: ...' line and exit code 2, not a traceback."""
    try:
        main(argv)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
