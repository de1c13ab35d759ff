"""The long-tuning comparison of launch/lora_long.sh as one table: for no tuning, LoRA and full
fine-tuning, the Drift Score and toy presence of each evaluated length, the training run's peak memory
(measured: GNU time's maximum resident set size of the process; planned: hiar.plan's per-GPU estimate
for one GPU) and the size of what the run ships (adapter.safetensors, or the whole model).

    python -m eval.lora_long runs/toy/lora_long       # writes runs/toy/lora_long/summary.md and summary.json

Reads only files: <run>/{lora,full}/config.yaml and their exports, <run>/{lora,full}.time, and
<run>/eval_<N>s/report.json (eval.report) for every length evaluated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from hiar.atomic import atomic_path
from hiar.config import config_from_dict, repo_path
from hiar.outputs import exit_code
from hiar.plan import GiB, estimate

METHODS = ("none", "lora", "full")  # the names launch/lora_long.sh gives eval.rollout's methods
UNTUNED = "checkpoints/toy_hiar.safetensors"


def peak_rss(path: Path) -> float | None:
    """GiB of a GNU `time -v` report's maximum resident set size, or None without one."""
    if not path.is_file():
        return None
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    return int(found.group(1)) * 1024 / GiB if found else None


def training(run: Path, method: str) -> dict:
    """What a trained variant cost: peak memory measured and planned, trained parameters, shipped bytes."""
    if method == "none":
        return {"ships": repo_path(UNTUNED).stat().st_size}
    folder = run / method
    cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    plan = estimate(cfg, 1, 80, hints=False)
    ships = folder / ("adapter.safetensors" if cfg.lora.rank else "model.safetensors")
    return {"steps": cfg.train.steps, "lr": cfg.train.lr, "lora_rank": cfg.lora.rank,
            "peak_rss_gib": peak_rss(run / f"{method}.time"), "planned_gpu_gib": plan.gpu_total / GiB,
            "planned_generator_states_gib": sum(v for k, v in plan.per_gpu.items() if k.startswith("generator.")) / GiB,
            "ships": ships.stat().st_size}


def drift(run: Path) -> dict[int, dict]:
    """Per evaluated length (seconds): report.json's per-method summaries."""
    out = {}
    for folder in sorted(run.glob("eval_*s"), key=lambda f: int(f.name[5:-1])):  # 60 before 300
        report = folder / "report.json"
        if report.is_file():
            out[int(folder.name[5:-1])] = json.loads(report.read_text())["methods"]
    return out


def table(costs: dict[str, dict], lengths: dict[int, dict]) -> str:
    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    head = ["method"] + [f"{name} {s} s" for s in lengths for name in ("drift", "presence last")]
    head += ["peak RSS GiB", "planned GPU GiB (1 GPU)", "generator states GiB", "ships MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in METHODS:
        c, row = costs[m], [m]
        for summaries in lengths.values():
            s = summaries.get(m, {})
            presence = s.get("per_segment", {}).get("toy_presence")
            row += [num(s.get("drift_score"), "{:.4f}"), num(presence[-1] if presence else None, "{:.2f}")]
        row += [num(c.get("peak_rss_gib"), "{:.2f}"), num(c.get("planned_gpu_gib"), "{:.4f}"),
                num(c.get("planned_generator_states_gib"), "{:.4f}"), f"{c['ships'] / 1e6:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summarise(run: Path) -> dict:
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder: give launch/lora_long.sh's OUT")
    costs = {m: training(run, m) for m in METHODS}
    lengths = drift(run)
    text = table(costs, lengths)
    with atomic_path(run / "summary.md") as tmp:
        tmp.write_text(text)
    with atomic_path(run / "summary.json") as tmp:
        tmp.write_text(json.dumps({"training": costs, "drift": {s: {m: {"drift_score": v.get("drift_score"),
                                   "toy_presence": v.get("per_segment", {}).get("toy_presence")}
                                   for m, v in summaries.items()} for s, summaries in lengths.items()}}, indent=1))
    print(text, end="")
    return costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="launch/lora_long.sh's OUT folder")
    args = p.parse_args(argv)
    return exit_code(lambda: summarise(Path(args.run)))


if __name__ == "__main__":
    sys.exit(main())
