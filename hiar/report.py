"""The drift report of a scored run: report.json (the per-method summaries), report.md (tables: method x
metric, drift slopes, first -> last segment values, VBench when present) and plots/metrics.png and
plots/contact_sheet.png, all views of <run>/scores.json (hiar/scoring.py) and <run>/vbench/vbench.json,
each written atomically (eval.report).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from hiar.atomic import atomic_path
from hiar.video import read_video

SHEET_VIDEOS = 2  # videos a method in the contact sheet
SHEET_LABEL_WIDTH = 200  # pixels of the method-name column
SHEET_MIN_HEIGHT = 128  # smaller frames (the toy world's 64 px) are enlarged, nearest neighbour, to be seen


def _missing(x: float | None) -> bool:
    """Nothing measured: None, or NaN (a share over no judged objects, a score of no video)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x: float | None, digits: int = 3) -> str:
    if _missing(x):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def percent(share: float | None) -> str:
    """A share as a percentage for a table or a log line; "n/a" where nothing was judged."""
    return "n/a" if _missing(share) else f"{share:.0%}"


def markdown(scores: dict, vbench: dict | None) -> str:
    methods = scores["methods"]
    names = sorted({n for m in methods.values() for n in m["summary"]["slope"]})
    lines = ["# Drift report", "",
             f"{len(methods)} methods, {scores['segments']} segments a video. Slope: least-squares change of the "
             "per-segment mean from the start of the video to its end, in the metric's unit. Drift Score: "
             f"`{scores['drift_score']['definition']}` (weights and floors in hiar/drift.py).", "",
             "| method | videos | seconds | Drift Score |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {s['videos']} | {fmt(s['seconds'])} | {fmt(s['drift_score'])} |"
              for m, s in ((m, v["summary"]) for m, v in methods.items())]
    header = "| method | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names)
    lines += ["", "## Drift slope (change over the video)", "", header]
    lines += [f"| {m} | " + " | ".join(fmt(v["summary"]["slope"].get(n)) for n in names) + " |"
              for m, v in methods.items()]
    lines += ["", "## First segment -> last segment", "", header]
    lines += [f"| {m} | " + " | ".join(f"{fmt(v['summary']['per_segment'][n][0])} -> "
                                       f"{fmt(v['summary']['per_segment'][n][-1])}" for n in names) + " |"
              for m, v in methods.items()]
    lines += ["", "Units and directions:", ""]
    lines += [f"* `{n}` ({info['unit']}; {'higher is better' if info['higher_is_better'] else 'lower is better' if info['higher_is_better'] is False else 'neither better'}): {info['description']}"
              for n, info in sorted(scores["metrics"].items())]
    if scores.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(scores["skipped"])]
    if vbench:
        dims = vbench["dimensions"]
        lines += ["", "## VBench (custom input, clips of "
                  f"{vbench['clip_seconds']} s as VBench-Long splits them)", "",
                  "| method | " + " | ".join(f"{d} | {d} slope" for d in dims) + " |",
                  "| --- |" + " --- | --- |" * len(dims)]
        lines += [f"| {m} | " + " | ".join(f"{fmt(v['summary'][d]['mean'])} | {fmt(v['summary'][d]['slope'])}"
                                           for d in dims) + " |" for m, v in vbench["methods"].items()]
    lines += ["", "![metrics against time](plots/metrics.png)", "", "![contact sheet](plots/contact_sheet.png)", ""]
    return "\n".join(lines)


def plot_metrics(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = scores["methods"]
    names = sorted({n for m in methods.values() for n in m["summary"]["per_segment"]})
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for method, v in methods.items():
            s = v["summary"]
            seconds = s["seconds"]
            t_key, y_key = ("timeline_time", "timeline") if "timeline" in s else ("segment_time", "per_segment")
            ax.plot(np.array(s[t_key]) * seconds, s[y_key][name], label=method, marker="." if t_key == "segment_time"
                    else None)
        info = scores["metrics"][name]
        ax.set_title(f"{name} ({info['unit']})", fontsize=9)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def contact_sheet(scores: dict, root: Path, path: Path) -> None:
    """A frame from the middle of each segment; rows: method x its first SHEET_VIDEOS videos, each
    labelled with the method's name on its left."""
    import cv2
    import imageio.v3 as iio

    rows, labels = [], []
    for name, method in scores["methods"].items():
        for i, video in enumerate(list(method["videos"].values())[:SHEET_VIDEOS]):
            frames = read_video(root / video["path"])
            rows.append(np.concatenate([frames[(a + b) // 2] for a, b in video["segments"]], axis=1))
            labels.append(f"{name} #{i}")
    scale = max(1, math.ceil(SHEET_MIN_HEIGHT / max(r.shape[0] for r in rows)))
    rows = [r.repeat(scale, axis=0).repeat(scale, axis=1) for r in rows]
    width = max(r.shape[1] for r in rows)
    sheet = []
    for row, label in zip(rows, labels):
        strip = np.zeros((row.shape[0], SHEET_LABEL_WIDTH, 3), np.uint8)
        cv2.putText(strip, label, (6, row.shape[0] // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
        # videos of other sizes are padded with black to the widest row
        sheet.append(np.concatenate([strip, np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)))], axis=1))
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.concatenate(sheet, axis=0), extension=".png")


def read_json(path: Path, keys: tuple[str, ...], made_by: str) -> dict:
    """A JSON file another program wrote, with the keys this one reads; ValueError naming it otherwise."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): write it again with {made_by}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}, so it is not what {made_by} writes: write it again "
                         "with that program")
    return data


def check_videos(scores: dict, run: Path, scores_path: Path) -> None:
    """The videos the contact sheet reads must be where scores.json says (paths relative to the run)."""
    for method in scores["methods"].values():
        for video in list(method["videos"].values())[:SHEET_VIDEOS]:
            if not (run / video["path"]).is_file():
                raise ValueError(f"{run / video['path']}, listed in {scores_path}, does not exist: put the videos "
                                 "back, or score them again where they are (python -m eval.drift --overwrite)")


def write_report(run: str | Path) -> dict:
    """Write the report of run folder `run`; ValueError naming the bad input before anything is drawn."""
    run = Path(run)
    if run.is_file():
        raise ValueError(f"{run} is a file: give the run folder that holds scores.json ({run.parent})")
    scores_path, vbench_path = run / "scores.json", run / "vbench" / "vbench.json"
    if not scores_path.is_file():
        raise ValueError(f"{scores_path} does not exist: score the run first (python -m eval.drift)")
    scores = read_json(scores_path, ("segments", "metrics", "methods", "drift_score"), "python -m eval.drift")
    if not scores["methods"]:
        raise ValueError(f"{scores_path} has no methods")
    check_videos(scores, run, scores_path)
    vbench = (read_json(vbench_path, ("dimensions", "methods", "clip_seconds"), "python -m eval.vbench read")
              if vbench_path.is_file() else None)
    (run / "plots").mkdir(exist_ok=True)
    plot_metrics(scores, run / "plots" / "metrics.png")
    contact_sheet(scores, run, run / "plots" / "contact_sheet.png")
    report = {"segments": scores["segments"], "drift_score": scores["drift_score"], "metrics": scores["metrics"],
              "skipped": scores.get("skipped", []),
              "methods": {m: v["summary"] for m, v in scores["methods"].items()},
              "vbench": {m: v["summary"] for m, v in vbench["methods"].items()} if vbench else None}
    with atomic_path(run / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    with atomic_path(run / "report.md") as tmp:
        tmp.write_text(markdown(scores, vbench))
    print(f"wrote {run / 'report.md'}, {run / 'report.json'} and {run / 'plots'}/")
    return report
