"""Which of a run's checkpoints draws its captions best? Each kept training checkpoint of a toy student
measured on the validation clips (as eval.toy_fidelity --split validation), ranked, and the best exported.

    python -m eval.toy_select --run runs/toy/hiar --export runs/toy/hiar/selected.safetensors
    python -m eval.toy_select --run runs/toy/x10/hiar --every 400 --use_ema

Why: a distilled toy student's fidelity swings by 10-15 points between checkpoints 100 iterations apart
(docs/toy_prompts.md, "Why the student draws fewer objects than its initialisation"), so the last
checkpoint is one draw of that swing. The validation clips are other clips, under other noise, than the
test clips every result is reported on, so a checkpoint chosen here is then measured without the luck
that chose it (eval.toy_fidelity on the export, eval.toy_compare against the last checkpoint).

The score is the mean of three shares of the prompted objects over both caption sets (the template and
the held-out phrasings): colour and presence, what the prompt names drawn for the whole clip, and the
objects moving at the world's speeds, what distillation is for: the ODE initialisation draws its objects
but moves most of them too fast, and DMD brings them to the teacher's speeds, so a score of colour and
presence alone prefers the least distilled checkpoint (docs/toy_prompts.md, "Choosing the checkpoint on
clips of its own"). Direction and shape are reported but not scored: the direction is a share of the
few dozen objects that move, good to about 13 points, wider than the swing it would choose among, and
shape is at most 15% for every toy student so far, so either would choose by the clips' luck. Ties go
to the later checkpoint.

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
from hiar.outputs import exit_code
from hiar.report import percent
from hiar.runs import CHECKPOINT_GLOB
from hiar.toyfidelity import CAPTION_SETS, evaluate, measured, question, write_fidelity

SCORED = ("colour", "presence", "at_speed")  # averaged over CAPTION_SETS into the score
REPORTED = (*SCORED, "direction_of_moving", "shape", "count")


def candidates(run: Path, every: int) -> list[tuple[int, Path]]:
    """(iteration, model.pt) of the run's kept checkpoints whose iteration is a multiple of `every`."""
    kept = sorted((int(d.name.removeprefix("step-")), d / "model.pt")
                  for d in (run / "checkpoints").glob(CHECKPOINT_GLOB) if (d / "model.pt").is_file())
    chosen = [(step, path) for step, path in kept if step % every == 0]
    if not chosen:
        raise ValueError(f"{run}/checkpoints: no step-N/model.pt with N a multiple of {every} (keep a run's "
                         "checkpoints with train.keep_checkpoints=0)")
    return chosen


def measures(summary: dict) -> dict:
    """REPORTED of one caption set's summary (hiar.toyfidelity.summarise); at_speed: the share of the
    prompted objects moving at the world's speeds."""
    return {m: summary["object_speeds"]["in_range"] if m == "at_speed" else summary[m] for m in REPORTED}


def row(step: int, checkpoint: Path, result: dict) -> dict:
    """A candidate: its measures by caption set and its score, the mean of SCORED over the sets."""
    by_set = {name: measures(result["by_captions"][name]) for name in CAPTION_SETS}
    score = sum(s[m] for s in by_set.values() for m in SCORED) / (len(by_set) * len(SCORED))
    return {"step": step, "checkpoint": str(checkpoint), "score": score, **by_set}


def plot(rows: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for name, style in zip(CAPTION_SETS, ("-", "--")):
        for measure, colour in zip(SCORED, ("tab:red", "tab:blue", "tab:green")):
            label = "at the world's speeds" if measure == "at_speed" else measure
            ax.plot(steps, [r[name][measure] for r in rows], style, color=colour, marker=".",
                    label=f"{label}, {name.replace('_', '-')} phrasings")
    ax.plot(steps, [r["score"] for r in rows], color="black", lw=2, label="score")
    ax.axvline(chosen["step"], color="grey", ls=":", label=f"chosen: {chosen['step']}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("share of prompted objects, validation clips")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    if args.export:
        if Path(args.export).suffix != ".safetensors":
            raise ValueError(f"--export {args.export}: a .safetensors file")
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)  # a folder it cannot make fails before sampling
    run = Path(args.run)
    out = Path(args.out) if args.out else run / ("selection_ema" if args.use_ema else "selection")
    found = candidates(run, args.every)
    asked = question(args.overrides, use_ema=args.use_ema, split="validation")

    rows = []
    for step, checkpoint in tqdm(found, desc="checkpoints", unit="ckpt"):
        folder = out / f"step-{step:08d}"
        if not measured(folder / "results.json", checkpoint, args.num_clips, **asked):
            result, videos = evaluate(str(checkpoint), args.overrides, "student", args.num_clips, args.batch_size,
                                      list(CAPTION_SETS), use_ema=args.use_ema, split="validation")
            # the record eval.toy_fidelity writes, which `measured` reads
            write_fidelity(folder, {"checkpoint": str(checkpoint), **asked, **result}, videos)
        rows.append(row(step, checkpoint, json.loads((folder / "results.json").read_text())))
    chosen = max(rows, key=lambda r: (r["score"], r["step"]))

    selection = {"run": str(run), "use_ema": args.use_ema, "num_clips": args.num_clips, "overrides": args.overrides,
                 "score": f"mean of {', '.join(SCORED)} over the {' and '.join(CAPTION_SETS)} captions",
                 "chosen": chosen["step"], "export": args.export, "candidates": rows}
    with atomic_path(out / "selection.json") as tmp:
        tmp.write_text(json.dumps(selection, indent=1))
    plot(rows, chosen, out / "selection.png")
    if args.export:
        model, cfg = load_generator(chosen["checkpoint"], None, args.use_ema)
        save_model(model, cfg, args.export, extra={"hiar_selected_from": chosen["checkpoint"],
                                                   "hiar_selected_ema": str(args.use_ema)})

    shown = " | ".join(f"{name}: {', '.join(m.replace('_', ' ') for m in REPORTED[:4])}" for name in CAPTION_SETS)
    print(f"\n| iteration | score | {shown} |\n| --- | --- |" + " --- |" * len(CAPTION_SETS))
    for r in rows:
        mark = " (chosen)" if r is chosen else ""
        cells = " | ".join(", ".join(percent(r[name][m]) for m in REPORTED[:4]) for name in CAPTION_SETS)
        print(f"| {r['step']}{mark} | {percent(r['score'])} | {cells} |")
    exported = f"; exported to {args.export}" if args.export else ""
    print(f"chose iteration {chosen['step']}{exported}; wrote {out / 'selection.json'} and {out / 'selection.png'}")
    return selection


def cli(argv=None) -> int:
    """main() as a program: bad input is one 'error: ...' line and exit code 2, not a traceback."""
    return exit_code(lambda: main(argv), also=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(cli())
