"""python -m eval <program> [args]: the evaluation programs behind one name.

    python -m eval toy_videos --out runs/eval/toy/videos      reference videos (truth, known fade)
    python -m eval drift --videos runs/eval/toy/videos --out runs/eval/toy/scores.json
    python -m eval rollout --out runs/eval/long --method hiar=CKPT ...
    python -m eval vbench clips|read ...                      (launch/vbench.sh runs VBench itself)
    python -m eval report runs/eval/toy
"""

import importlib
import sys

PROGRAMS = ("toy_videos", "drift", "rollout", "vbench", "report")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(importlib.import_module(f"eval.{sys.argv[1]}").main(sys.argv[2:]))
