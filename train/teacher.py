"""Train the toy world's bidirectional teacher by flow matching (with caption dropout for CFG).

    deepspeed train/teacher.py --config_path configs/toy/teacher.yaml
    python train/teacher.py --config_path configs/toy/teacher.yaml --resume      # one process

Writes checkpoints/, samples/ and, at the end, model.safetensors under train.output_dir.
"""

from __future__ import annotations

import argparse

from hiar.config import load_config
from hiar.toyteacher import train_teacher
from hiar.training import main_guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/toy/teacher.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)  # options may follow the section.key=value overrides


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config_path, args.overrides)
    train_teacher(cfg, resume=args.resume)


if __name__ == "__main__":
    main_guard(main)
