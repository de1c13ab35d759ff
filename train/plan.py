"""Plan a distillation run's memory before starting it: per GPU and per host, by component, for the
config's ZeRO stage and placements; whether it fits; which setting frees the most if not; a rough time
per iteration (the library: hiar/plan.py; how each component is modelled: docs/memory.md).

    python train/plan.py --config_path configs/hiar.yaml --gpus 8 --gpu_memory 80
    python train/plan.py --config_path configs/hiar.yaml --gpus 64 --gpu_memory 80 distill.teacher_sharding=zero3

Exit code 0 if the run fits, 1 if it does not, 2 for a config error.
"""

from __future__ import annotations

import argparse
import sys

from hiar.config import ConfigError, load_config
from hiar.plan import DEFAULT_TFLOPS, estimate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/hiar.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run (the world size)")
    p.add_argument("--gpu_memory", type=float, required=True, help="memory of one GPU, GiB (an H100 80GB: 79.6)")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--host_memory", type=float, default=None, help="host memory of one node, GiB (checked when given)")
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="sustained bf16 TFLOP/s for the time estimate")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config_path, args.overrides)
        plan = estimate(cfg, args.gpus, args.gpu_memory, args.gpus_per_node, args.host_memory, tflops=args.tflops)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
