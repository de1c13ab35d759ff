"""Is one toy model's fidelity different from another's, or is it the clips? Two eval.toy_fidelity runs on
the same held-out clips, compared clip by clip.

    python -m eval.toy_compare runs/toy/ode_init/fidelity runs/toy/hiar/fidelity
    python -m eval.toy_compare A/results.json B/results.json --out runs/toy/compare.json

For each caption set both runs measured, and each measure (colour, shape, direction of moving objects and
of those in two-object scenes prompted two ways, count, presence, presence in the last fifth): A, B and
B - A with a 95% interval from resampling the clips (`hiar.toyfidelity.paired_difference`). A
difference whose interval holds 0 is not told apart from the draw of clips: on 96 clips (146 objects)
that is about +-5 points of colour, +-3 to 4 of presence and +-12 of direction (only 50-60 objects
move; about 45 of them in two-object scenes prompted two ways).
Both runs must measure the same clips (the same --num_clips and --captions). A missing file or runs of
different clips end it with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hiar.atomic import atomic_path
from hiar.outputs import exit_code
from hiar.report import percent
from hiar.toyfidelity import paired_difference


def results(path: str) -> dict:
    """An eval.toy_fidelity results.json, or the folder holding one."""
    file = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no results.json (run eval.toy_fidelity --out {path})")
    by_captions = json.loads(file.read_text()).get("by_captions", {})
    if not all("per_clip" in s for s in by_captions.values()):
        raise ValueError(f"{file}: no per-clip results (a summary without per_clip cannot be compared)")
    return by_captions


def signed(share: float) -> str:
    return f"{share * 100:+.0f}"


def table(name_a: str, name_b: str, compared: dict[str, dict]) -> str:
    lines = [f"A: {name_a}", f"B: {name_b}", "", "| captions | measure | A | B | B - A (95% interval) |",
             "| --- | --- | --- | --- | --- |"]
    for captions, measures in compared.items():
        for name, m in measures.items():
            apart = "**" if m["low"] > 0 or m["high"] < 0 else ""  # the interval leaves out 0
            lines.append(f"| {captions} | {name.replace('_', ' ')} | {percent(m['a'])} | {percent(m['b'])} | "
                         f"{apart}{signed(m['difference'])}{apart} ({signed(m['low'])}, {signed(m['high'])}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the reference run: eval.toy_fidelity's --out folder or its results.json")
    p.add_argument("b", help="the run compared with it")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    if args.resamples < 100:
        raise ValueError(f"--resamples={args.resamples}: at least 100 for a 95% interval")
    a, b = results(args.a), results(args.b)
    shared = [c for c in a if c in b]
    if not shared:
        raise ValueError(f"the runs share no caption set ({', '.join(a)} against {', '.join(b)})")
    compared = {c: paired_difference(a[c]["per_clip"], b[c]["per_clip"], args.resamples, args.seed) for c in shared}
    print(table(args.a, args.b, compared))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({"a": args.a, "b": args.b, "resamples": args.resamples, "by_captions": compared},
                                      indent=1))
    return compared


def cli(argv=None) -> int:
    """main() as a program: bad input is one 'error: ...' line and exit code 2, not a traceback."""
    return exit_code(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
