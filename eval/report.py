"""Turn a scored run into report.json, report.md and plots a person would rather look at than read.

    python -m eval.report runs/eval/toy

Reads <run>/scores.json (eval.drift / eval.rollout) and, when present, <run>/vbench/vbench.json
(launch/vbench.sh). Writes <run>/report.json (the per-method summaries), <run>/report.md (tables:
method x metric, with drift slopes and first -> last segment values), <run>/plots/metrics.png (each
metric against time, one line per method) and <run>/plots/contact_sheet.png (a frame from the middle
of each segment, one row per method and video). These files are views of scores.json, so a run
rewrites them (each atomically): run it again after re-scoring or adding VBench results.
"""

from __future__ import annotations

import argparse
import sys

from hiar.outputs import exit_code
from hiar.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder holding scores.json")
    args = p.parse_args(argv)
    return exit_code(lambda: write_report(args.run))


if __name__ == "__main__":
    sys.exit(main())
