"""The toy-scale reproduction table: every trained variant through the same evaluation, written into
docs/results.md between its `generated` markers (the reading around them is written by people).

    python -m eval.toy_results --runs runs/toy --out runs/toy/results --doc docs/results.md --label 1x
    python -m eval.toy_results --runs runs/toy/x10 --out runs/toy/x10/results --label 10x

Each --label (a training length) has its own section and assets (results/<label>/ beside
docs/results.md); a second generated section compares every label evaluated so far (from their
summary.json files).

Per variant (a checkpoint under --runs, model.safetensors or --weights, and the order it is sampled
in): toy-world fidelity of short clips of held-out captions (`eval.toy_fidelity`: prompted colours
recovered, objects moving at the world's speeds; and per prompted object its colour, shape, direction,
count and presence), phrased both in the training template and in the held-out phrasings, and the same
for fewer, longer videos at each
--fidelity_seconds (default 60 s and 5 minutes, --fidelity_clips videos each: does the video still show
its prompt at the end? About 8 minutes a variant on a 2-core CPU at the defaults), then long rollouts
of the same captions and seeds for every variant (`eval.rollout`, wavefront, flat memory) scored for
drift (`eval.drift`) and reported (`eval.report`: report.md and plots). Each of those programs runs as
its own process, as it would from the command line, and this one reads the files it writes; the first
that fails ends the run with exit code 2. The table, the plots and the raw JSON are copied next to the
doc. --out is this program's own working folder: every run regenerates it, its long rollouts included,
except that with --resume a fidelity measurement already there is kept when it is of the same checkpoint,
written after it, with the same overrides, video length, caption sets and clip count. Those measurements
are most of the work (hours on a 2-core CPU at 1x1-latent tokens), so an evaluation stopped by a crash
or the end of a session continues where it stopped (launch/reproduce_toy.sh passes --resume; delete
--out to measure afresh, e.g. after changing hiar/toyfidelity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hiar.atomic import atomic_path
from hiar.report import percent
from hiar.toyfidelity import CAPTION_SETS, measured, question
from hiar.toyworld import sample_clip

ROOT = Path(__file__).resolve().parent.parent  # the repository, which holds the eval programs
# name -> (run folder under --runs, inference overrides, what it shows)
VARIANTS = {
    "hiar": ("hiar", [], "HiAR: step-first, context at t_{j+1}, forward-KL"),
    "self_forcing": ("self_forcing", ["sampling.method=frame_first"], "Self-Forcing: block-first, clean context"),
    "self_forcing_stepfirst": ("self_forcing", ["sampling.method=timestep_first"],
                               "the Self-Forcing student sampled step-first, no retraining"),
    "hiar_no_fkl": ("hiar_no_fkl", [], "HiAR without forward-KL (DMD alone)"),
    "hiar_ctx_current": ("hiar_ctx_current", ["sampling.context_level=current"], "HiAR, context at t_j"),
    "hiar_ctx_clean": ("hiar_ctx_clean", ["sampling.context_level=clean"], "HiAR, clean context (t = 0)"),
    # sampled in the variants' window, which configs/toy/ode_init.yaml stores in the model, so long videos
    # compare alike and cost linear time, not quadratic
    "ode_init": ("ode_init", ["sampling.method=timestep_first"],
                 "the ODE-initialised student all start from"),
}
HELD_OUT_SEED = 515151  # captions of clips no stage trained on
METRICS = ["saturation", "toy_object_error", "toy_presence", "motion", "frame_l1"]  # the table's drift columns
PROMPT_MEASURES = ["colour", "shape", "direction_of_moving", "direction_last_fifth", "count", "presence",
                   "presence_last_fifth"]


def markers(section: str) -> tuple[str, str]:
    return f"<!-- generated:{section}:start -->", f"<!-- generated:{section}:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/toy", help="folder of the training runs (one sub-folder a variant)")
    p.add_argument("--out", default="runs/toy/results")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--num_clips", type=int, default=40, help="short clips a variant for fidelity")
    p.add_argument("--fidelity_seconds", type=float, nargs="*", default=[60.0, 300.0],
                   help="lengths of the longer videos whose prompts are checked too (none: short clips only)")
    p.add_argument("--fidelity_clips", type=int, default=4,
                   help="videos a variant and caption set at each --fidelity_seconds")
    p.add_argument("--num_long", type=int, default=4, help="long videos a variant for drift")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the long videos")
    p.add_argument("--config_path", default="configs/toy/hiar.yaml", help="the long rollouts' config")
    p.add_argument("--label", default="1x", help="the training length these runs had (names the doc section)")
    p.add_argument("--weights", default="model.safetensors", help="the file of each run folder to measure, e.g. "
                   "selected.safetensors: the checkpoint eval.toy_select chose (launch/reproduce_toy.sh SELECT); a "
                   "run without it, such as the ODE initialisation, is measured at model.safetensors")
    p.add_argument("--resume", action="store_true",
                   help="keep the fidelity measurements in --out that this run would repeat (see above)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every variant, as the runs were trained (launch/reproduce_toy.sh's "
                        "OVERRIDES, e.g. model.patch_size=[1,1,1])")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_program(program: str, *args: str) -> int:
    """`python -m eval.<program> args` in a process of its own (its output passes through): its exit code.
    It runs in this one's folder, so relative paths mean the same, with this repository importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", f"eval.{program}", *args],
                          env={**os.environ, "PYTHONPATH": path}).returncode


def evaluate(args: argparse.Namespace) -> int:
    if args.fidelity_clips < 1 or any(s <= 0 for s in args.fidelity_seconds):
        given = " ".join(f"{s:g}" for s in args.fidelity_seconds)
        raise ValueError(f"--fidelity_clips={args.fidelity_clips}, --fidelity_seconds={given}: give a clip or more "
                         "and positive lengths")
    runs, out = Path(args.runs), Path(args.out)
    # each variant's overrides after those of the whole recipe (--overrides: how every run was trained)
    present = {name: (run, [*args.overrides, *own], what) for name, (run, own, what) in VARIANTS.items()
               if (runs / run / "model.safetensors").is_file()}
    if not present:
        print(f"error: no trained variant under {runs} (run launch/reproduce_toy.sh)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    # 1. short clips, then longer videos: does each variant draw its captions, and still at the end?
    fidelity = {name: {} for name in present}
    lengths = [("short", args.num_clips, [])] + [(f"{s:g} s", args.fidelity_clips, ["--seconds", f"{s:g}"])
                                                 for s in args.fidelity_seconds]
    for name, (run, overrides, _) in present.items():
        for length, clips, seconds in lengths:
            folder, checkpoint = out / "fidelity" / length.replace(" ", "") / name, weights(runs / run, args.weights)
            asked = question(overrides, float(seconds[1]) if seconds else None)
            if args.resume and measured(folder / "results.json", checkpoint, clips, **asked):
                print(f"== {name}, {length}: kept {folder} (--resume)")
            elif run_program("toy_fidelity", "--checkpoint", str(checkpoint), "--num_clips", str(clips),
                             "--captions", *CAPTION_SETS, *seconds, "--out", str(folder), *overrides) != 0:
                return 2
            fidelity[name][length] = json.loads((folder / "results.json").read_text())

    # 2. long rollouts of the same captions and seeds, scored and reported
    prompts = out / "long_prompts.txt"
    prompts.write_text("".join(sample_clip(HELD_OUT_SEED, i).caption + "\n" for i in range(args.num_long)))
    methods = [f"--method={name}={weights(runs / run, args.weights)}" + "".join(f":{o}" for o in overrides)
               for name, (run, overrides, _) in present.items()]
    if run_program("rollout", "--out", str(out / "long"), "--config_path", args.config_path, "--data_path",
                   str(prompts), "--seconds", str(args.seconds), "--overwrite", *methods) != 0:
        return 2
    if run_program("report", str(out / "long")) != 0:  # its assets are copied below
        return 2
    scores = json.loads((out / "long" / "scores.json").read_text())

    # 3. the table, the plots and the raw results next to the doc
    doc = Path(args.doc)
    assets = doc.with_suffix("") / args.label  # beside the doc: results/<label>/ for docs/results.md
    assets.mkdir(parents=True, exist_ok=True)
    for src in ("long/plots/metrics.png", "long/plots/contact_sheet.png", "long/scores.json"):
        shutil.copy(out / src, assets / Path(src).name)
    # the report's plots sit beside it here, not in plots/: its image links follow them
    (assets / "report.md").write_text((out / "long/report.md").read_text().replace("](plots/", "]("))
    rows = summary(fidelity, scores)
    (assets / "summary.json").write_text(json.dumps(rows, indent=1))
    write_doc(doc, args.label, table(present, rows, args, assets.relative_to(doc.parent)))
    write_doc(doc, "lengths", by_length(doc.with_suffix("")))
    print(f"wrote {doc} and {assets}/")
    return 0


def weights(run: Path, name: str) -> Path:
    """The weights of a run folder to measure: `name` where the run has it, else its model.safetensors."""
    return run / name if (run / name).is_file() else run / "model.safetensors"


def summary(fidelity: dict, scores: dict) -> dict:
    """variant -> the tables' numbers (what <assets>/summary.json keeps). `prompts`: per video
    length and caption set, the PROMPT_MEASURES of eval.toy_fidelity's summary."""
    return {name: {"colour_fidelity": f["short"]["colour_fidelity"], "moving": f["short"]["moving"],
                   "drift_score": scores["methods"][name]["summary"]["drift_score"],
                   "slope": {m: scores["methods"][name]["summary"]["slope"].get(m, float("nan")) for m in METRICS},
                   "prompts": {length: {captions: prompt_measures(s) for captions, s in r["by_captions"].items()}
                               for length, r in f.items()}}
            for name, f in fidelity.items()}


def prompt_measures(s: dict) -> dict:
    """The prompt table's numbers from one caption set's eval.toy_fidelity summary (X_last_fifth: the last
    part of its X_by_segment)."""
    last = "_last_fifth"
    return {m: s[m.removesuffix(last) + "_by_segment"][-1] if m.endswith(last) else s[m] for m in PROMPT_MEASURES}


def table(present: dict, rows: dict, args: argparse.Namespace, assets: Path) -> str:
    head = ("| variant | what | colour fidelity | moving | Drift Score | "
            + " | ".join(f"{m} slope" for m in METRICS) + " |")
    trained = f" with {' '.join(args.overrides)}" if args.overrides else ""
    lines = [f"Training length {args.label}, runs under `{args.runs}`{trained}. Short clips: {args.num_clips} "
             f"held-out captions, 21 latent frames each. Long videos: {args.num_long} captions x {args.seconds:.0f} s, "
             "same seeds for every variant. Slopes: change from the start of the video to its end (hiar/drift.py).", "",
             head, "| --- " * (5 + len(METRICS)) + "|"]
    for name, (_, _, what) in present.items():
        r = rows[name]
        slopes = " | ".join(f"{r['slope'][m]:+.3g}" for m in METRICS)
        lines.append(f"| {name} | {what} | {r['colour_fidelity']:.0%} | {r['moving']:.0%} | {r['drift_score']:.3f} | "
                     f"{slopes} |")
    lines += ["", prompt_table(present, rows, args)]
    missing = [n for n in VARIANTS if n not in present]
    if missing:
        lines += ["", f"Not trained at this length: {', '.join(missing)}."]
    lines += ["", f"![metrics over time]({assets.as_posix()}/metrics.png)", "",
              f"![contact sheet]({assets.as_posix()}/contact_sheet.png)"]
    return "\n".join(lines)


def prompt_table(present: dict, rows: dict, args: argparse.Namespace) -> str:
    """What the prompts say, object by object: one row a variant, video length and caption set."""
    lines = [f"What the prompts say (hiar/toyfidelity.py), per prompted object (count: per video): short "
             f"clips ({args.num_clips} held-out captions) and {args.fidelity_clips} videos at each longer "
             "length, phrased in the training template and in held-out phrasings no stage trained on. "
             "Direction: of the objects that move, from the start of the video; last fifth: moving the prompted "
             "way at the world's speeds over the video's last fifth; presence: the frames showing the object, "
             "over the video and over its last fifth.", "",
             "| variant | video | captions | colour | shape | direction | direction, last fifth | count | presence "
             "| presence, last fifth |",
             "| --- " * 10 + "|"]
    for name in present:
        for length, by_captions in rows[name]["prompts"].items():
            for captions, m in by_captions.items():
                lines.append(f"| {name} | {length} | {captions} | "
                             + " | ".join(percent(m[k]) for k in PROMPT_MEASURES) + " |")
    return "\n".join(lines)


def by_length(assets: Path) -> str:
    """Every evaluated training length side by side: colour fidelity / moving / Drift Score a variant."""
    found = {p.parent.name: json.loads(p.read_text()) for p in assets.glob("*/summary.json")}
    labels = sorted(found, key=lambda label: float(label.rstrip("x")) if label.rstrip("x").isdigit() else 1e9)
    lines = ["Colour fidelity / moving / Drift Score of each variant at every training length evaluated so far "
             "(`-`: not trained at that length).", "",
             "| variant | " + " | ".join(labels) + " |", "| --- " * (1 + len(labels)) + "|"]
    for name in VARIANTS:
        cells = [f"{r['colour_fidelity']:.0%} / {r['moving']:.0%} / {r['drift_score']:.3f}"
                 if (r := found[label].get(name)) else "-" for label in labels]
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(doc: Path, section: str, generated: str) -> None:
    """Replace what lies between the section's markers (or append them), keeping the people's text around."""
    begin, end = markers(section)
    text = doc.read_text() if doc.is_file() else "# Results\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    with atomic_path(doc) as tmp:
        tmp.write_text(f"{before}{begin}\n{generated}\n{end}{after}")


if __name__ == "__main__":
    sys.exit(main())
