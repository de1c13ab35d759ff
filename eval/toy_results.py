"""The toy-scale reproduction table: every trained variant through the same evaluation, written into
docs/results.md between its `generated` markers (the reading around them is written by people).

    python -m eval.toy_results --runs runs/toy --out runs/toy/results --doc docs/results.md

Per variant (a checkpoint under --runs and the order it is sampled in): toy-world fidelity of short clips
of held-out captions (`eval.toy_fidelity`: prompted colours recovered, objects moving at the world's
speeds), then long rollouts of the same captions and seeds for every variant (`eval.rollout`, wavefront,
flat memory) scored for drift (`eval.drift`) and reported (`eval.report`: report.md and plots). The
table, the plots and the raw JSON are copied next to the doc.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from eval import report, rollout, toy_fidelity
from hiar.atomic import atomic_path
from hiar.toyworld import sample_clip

# name -> (run folder under --runs, inference overrides, what it shows)
VARIANTS = {
    "hiar": ("hiar", [], "HiAR: step-first, context at t_{j+1}, forward-KL"),
    "self_forcing": ("self_forcing", ["sampling.method=frame_first"], "Self-Forcing: block-first, clean context"),
    "self_forcing_stepfirst": ("self_forcing", ["sampling.method=timestep_first"],
                               "the Self-Forcing student sampled step-first, no retraining"),
    "hiar_no_fkl": ("hiar_no_fkl", [], "HiAR without forward-KL (DMD alone)"),
    "hiar_ctx_current": ("hiar_ctx_current", ["sampling.context_level=current"], "HiAR, context at t_j"),
    "hiar_ctx_clean": ("hiar_ctx_clean", ["sampling.context_level=clean"], "HiAR, clean context (t = 0)"),
    "ode_init": ("ode_init", ["sampling.method=timestep_first"], "the ODE-initialised student all start from"),
}
HELD_OUT_SEED = 515151  # captions of clips no stage trained on
METRICS = ["saturation", "toy_object_error", "toy_presence", "motion", "frame_l1"]  # the table's drift columns
BEGIN, END = "<!-- generated:start -->", "<!-- generated:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/toy", help="folder of the training runs (one sub-folder a variant)")
    p.add_argument("--out", default="runs/toy/results")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--num_clips", type=int, default=40, help="short clips a variant for fidelity")
    p.add_argument("--num_long", type=int, default=4, help="long videos a variant for drift")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the long videos")
    p.add_argument("--config_path", default="configs/toy/hiar.yaml", help="the long rollouts' config")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    present = {name: v for name, v in VARIANTS.items() if (runs / v[0] / "model.safetensors").is_file()}
    if not present:
        print(f"error: no trained variant under {runs} (run launch/reproduce_toy.sh)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    # 1. short clips: does each variant draw its captions?
    fidelity = {}
    for name, (run, overrides, _) in present.items():
        fidelity[name] = toy_fidelity.main(["--checkpoint", str(runs / run / "model.safetensors"), "--num_clips",
                                            str(args.num_clips), "--out", str(out / "fidelity" / name), *overrides])

    # 2. long rollouts of the same captions and seeds, scored and reported
    prompts = out / "long_prompts.txt"
    prompts.write_text("".join(sample_clip(HELD_OUT_SEED, i).caption + "\n" for i in range(args.num_long)))
    methods = [f"--method={name}={runs / run / 'model.safetensors'}" + "".join(f":{o}" for o in overrides)
               for name, (run, overrides, _) in present.items()]
    if rollout.main(["--out", str(out / "long"), "--config_path", args.config_path, "--data_path", str(prompts),
                     "--seconds", str(args.seconds), *methods]) != 0:
        return 2
    report.main([str(out / "long")])
    scores = json.loads((out / "long" / "scores.json").read_text())

    # 3. the table, the plots and the raw results next to the doc
    doc = Path(args.doc)
    assets = doc.with_suffix("")  # docs/results/
    assets.mkdir(parents=True, exist_ok=True)
    for src in ("long/plots/metrics.png", "long/plots/contact_sheet.png", "long/report.md", "long/scores.json"):
        shutil.copy(out / src, assets / Path(src).name)
    summary = {n: {"colour_fidelity": f["colour_fidelity"], "moving": f["moving"]} for n, f in fidelity.items()}
    (assets / "fidelity.json").write_text(json.dumps(summary, indent=1))
    write_doc(doc, table(present, fidelity, scores, args))
    print(f"wrote {doc} and {assets}/")
    return 0


def table(present: dict, fidelity: dict, scores: dict, args: argparse.Namespace) -> str:
    methods = scores["methods"]
    head = ("| variant | what | colour fidelity | moving | Drift Score | "
            + " | ".join(f"{m} slope" for m in METRICS) + " |")
    lines = [f"Short clips: {args.num_clips} held-out captions, 21 latent frames each. Long videos: "
             f"{args.num_long} captions x {args.seconds:.0f} s, same seeds for every variant. Slopes: change from the "
             "start of the video to its end (hiar/drift.py).", "", head, "| --- " * (5 + len(METRICS)) + "|"]
    for name, (_, _, what) in present.items():
        s = methods[name]["summary"]
        slopes = " | ".join(f"{s['slope'].get(m, float('nan')):+.3g}" for m in METRICS)
        lines.append(f"| {name} | {what} | {fidelity[name]['colour_fidelity']:.0%} | {fidelity[name]['moving']:.0%} | "
                     f"{s['drift_score']:.3f} | {slopes} |")
    missing = [n for n in VARIANTS if n not in present]
    if missing:
        lines += ["", "Not trained yet: " + ", ".join(missing) + "."]
    lines += ["", "![metrics over time](results/metrics.png)", "", "![contact sheet](results/contact_sheet.png)"]
    return "\n".join(lines)


def write_doc(doc: Path, generated: str) -> None:
    """Replace what lies between the markers (or append them), keeping the people's text around it."""
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    with atomic_path(doc) as tmp:
        tmp.write_text(f"{before}{BEGIN}\n{generated}\n{END}{after}")


if __name__ == "__main__":
    sys.exit(main())
