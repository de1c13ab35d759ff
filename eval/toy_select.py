"""Which of a run's checkpoints draws its captions best? Each kept training checkpoint of a toy student
measured on the validation clips (as eval.toy_fidelity --split validation), ranked, and the best exported.

    python -m eval.toy_select --run runs/toy/hiar --export runs/toy/hiar/selected.safetensors
    python -m eval.toy_select --run runs/toy/x10/hiar --every 400 --use_ema

Why: a distilled toy student's fidelity swings by 10-15 points between checkpoints 100 iterations apart
(docs/toy_prompts.md, "Why the student draws fewer objects than its initialisation"), so the last
checkpoint is one draw of that swing. The validation clips are other clips, under other noise, than the
test clips every result is reported on, so a checkpoint chosen here is then measured without the luck
that chose it (eval.toy_fidelity on the export, eval.toy_compare against the last checkpoint).

The score is the mean of colour and presence over both caption sets (the template and the held-out
phrasings): what the prompt names, drawn, for the whole clip. Direction and shape are reported but not
scored: about a third of the objects move, and shape is near 0 for every toy student so far, so on a few
dozen clips either would choose by chance. Ties go to the later checkpoint.

A run keeps every checkpoint with train.keep_checkpoints=0 (train/distill.py; a checkpoints/step-N/ folder
every train.save_every iterations). --every N measures only the iterations that are multiples of N. A
measurement already in --out of the same checkpoint and question is kept, so a rerun continues. Writes
OUT/selection.json (every candidate's scores, the choice), OUT/selection.png (the scores over iterations)
and OUT/step-N/ (each candidate's results.json and contact sheet, as eval.toy_fidelity writes them). Bad
input ends it with one line and exit code 2, before any sampling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from hiar.atomic import atomic_path
from hiar.checkpoints import CheckpointError, load_generator, save_model
from hiar.config import ConfigError
from hiar.report import percent
from hiar.toyfidelity import CAPTION_SETS, evaluate, measured, write_fidelity

SCORED = ("colour", "presence")  # averaged over CAPTION_SETS into the score
REPORTED = ("colour", "presence", "direction_of_moving", "shape", "count")


def candidates(run: Path, every: int) -> list[tuple[int, Path]]:
    """(iteration, model.pt) of the run's kept checkpoints whose iteration is a multiple of `every`."""
    kept = sorted((int(d.name.removeprefix("step-")), d / "model.pt")
                  for d in (run / "checkpoints").glob("step-*") if (d / "model.pt").is_file())
    chosen = [(step, path) for step, path in kept if step % every == 0]
    if not chosen:
        raise ValueError(f"{run}/checkpoints: no step-N/model.pt with N a multiple of {every} (keep a run's "
                         "checkpoints with train.keep_checkpoints=0)")
    return chosen


def score(result: dict) -> float:
    """The mean of SCORED over the caption sets of an eval.toy_fidelity result."""
    sets = [result["by_captions"][name] for name in CAPTION_SETS]
    return sum(s[measure] for s in sets for measure in SCORED) / (len(sets) * len(SCORED))


def row(step: int, checkpoint: Path, result: dict) -> dict:
    return {"step": step, "checkpoint": str(checkpoint), "score": score(result),
            **{name: {m: result["by_captions"][name][m] for m in REPORTED} for name in CAPTION_SETS}}


def plot(rows: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, style in zip(CAPTION_SETS, ("-", "--")):
        for measure, colour in zip(SCORED, ("tab:red", "tab:blue")):
            ax.plot(steps, [r[name][measure] for r in rows], style, color=colour, marker=".",
                    label=f"{measure}, {name.replace('_', '-')} phrasings")
    ax.plot(steps, [r["score"] for r in rows], color="black", lw=2, label="score")
    ax.axvline(chosen["step"], color="grey", ls=":", label=f"chosen: {chosen['step']}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("share of prompted objects, validation clips")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train/distill.py output folder (its checkpoints/step-N/)")
    p.add_argument("--out", help="default: RUN/selection, or RUN/selection_ema with --use_ema")
    p.add_argument("--every", type=int, default=1, help="measure only iterations that are multiples of this")
    p.add_argument("--num_clips", type=int, default=48, help="validation clips, in each caption set")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--use_ema", action="store_true", help="each checkpoint's EMA instead of its generator")
    p.add_argument("--export", help="write the chosen weights here (.safetensors, with the run's config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (student sampler)")
    args = p.parse_args(argv)
    if args.every < 1 or args.num_clips < 1:
        raise ValueError("--every and --num_clips must be at least 1")
    if args.export and Path(args.export).suffix != ".safetensors":
        raise ValueError(f"--export {args.export}: a .safetensors file")
    run = Path(args.run)
    out = Path(args.out) if args.out else run / ("selection_ema" if args.use_ema else "selection")
    found = candidates(run, args.every)
    question = {"overrides": args.overrides, "seconds": None, "sampler": "student", "use_ema": args.use_ema,
                "context": 0, "speed": None, "split": "validation"}

    rows = []
    for step, checkpoint in tqdm(found, desc="checkpoints", unit="ckpt"):
        folder = out / f"step-{step:08d}"
        if not measured(folder / "results.json", checkpoint, args.num_clips, **question):
            result, videos = evaluate(str(checkpoint), args.overrides, "student", args.num_clips, args.batch_size,
                                      list(CAPTION_SETS), None, None, 0, args.use_ema, "validation")
            # the record eval.toy_fidelity writes, which `measured` reads
            write_fidelity(folder, {"checkpoint": str(checkpoint), **question, **result}, videos)
        rows.append(row(step, checkpoint, json.loads((folder / "results.json").read_text())))
    chosen = max(rows, key=lambda r: (r["score"], r["step"]))

    selection = {"run": str(run), "use_ema": args.use_ema, "num_clips": args.num_clips, "overrides": args.overrides,
                 "score": f"mean of {' and '.join(SCORED)} over the {' and '.join(CAPTION_SETS)} captions",
                 "chosen": chosen["step"], "export": args.export, "candidates": rows}
    with atomic_path(out / "selection.json") as tmp:
        tmp.write_text(json.dumps(selection, indent=1))
    plot(rows, chosen, out / "selection.png")
    if args.export:
        model, cfg = load_generator(chosen["checkpoint"], None, args.use_ema)
        save_model(model, cfg, args.export, extra={"hiar_selected_from": chosen["checkpoint"],
                                                   "hiar_selected_ema": str(args.use_ema)})

    sets = " | ".join(f"{name}: colour, presence, direction of moving" for name in CAPTION_SETS)
    print(f"\n| iteration | score | {sets} |\n| --- | --- |" + " --- |" * len(CAPTION_SETS))
    for r in rows:
        mark = " (chosen)" if r is chosen else ""
        cells = " | ".join(", ".join(percent(r[name][m]) for m in ("colour", "presence", "direction_of_moving"))
                           for name in CAPTION_SETS)
        print(f"| {r['step']}{mark} | {percent(r['score'])} | {cells} |")
    exported = f"; exported to {args.export}" if args.export else ""
    print(f"chose iteration {chosen['step']}{exported}; wrote {out / 'selection.json'} and {out / 'selection.png'}")
    return selection


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
