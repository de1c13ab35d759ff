"""VBench and VBench-Long on folders of videos, as VBench's own code defines them. VBench runs in its own
environment (.venv-vbench, built by launch/vbench.sh from requirements-vbench.txt); this side cuts the
clips, says which dimensions can run, and reads the scores back.

    python -m eval.vbench run --out runs/eval/vb --data_path data/toy_prompts.txt --seconds 4 \\
        --method hiar=checkpoints/toy_hiar.safetensors --dimensions temporal_flickering
    bash launch/vbench.sh VIDEOS OUT [DIMENSION ...]       (clips -> VBench -> read, on videos you have)
    python -m eval.vbench clips --videos VIDEOS --out OUT/clips [--full_info F] [--scenes S] [--dimensions ...]
    python -m eval.vbench read --clips OUT/clips --results OUT/results --out OUT/vbench.json

The protocol (VBench-Long in vbench 0.1.5, vbench2_beta_long/ of github.com/Vchitect/VBench; the
file names are given in docs/evaluation.md):

* Scene split (VBenchLong.preprocess with use_semantic_splitting, utils.split_video_into_scenes):
  PySceneDetect's ContentDetector at threshold 35; a video with cuts becomes its scenes, each
  `<stem>-Scene-<k>`, split into clips on its own; without cuts it stays whole. Run inside
  .venv-vbench (launch/vbench_worker.py scenes); `clips --scenes` takes its [start, end) frames.
* Clip length (configs/clip_length_mix.yaml; utils.get_duration_from_json): 2 s for every dimension
  but human_action, temporal_style and overall_consistency (10 s). A video of VBench's standard prompt
  suite is cut at the longest length among its prompt's dimensions; any other prompt
  ('long_custom_input') at 2 s. A clip is int(fps) * int(seconds) frames (get_video_properties keeps
  int(fps)).
* Clips (utils.split_video_into_clips): consecutive clips of that many frames; when frames remain, one
  more full-length clip ending at the last frame (it overlaps the one before); a video (scene) shorter
  than a clip is one clip `<name>_full`. Clip i of <method>/<stem>.mp4 is <out>/<method>/<stem>_<iii>.mp4.
* Scoring: VBench's own compute_<dimension> on the clips (launch/vbench_worker.py score), in the
  standard suite's way for its prompts (the prompt's own dimensions and auxiliary_info) and in
  custom_input's way for others (every requested dimension that needs no auxiliary_info).
* Aggregation (utils.reorganize_clips_results): each long video's (each scene's) score is the mean of
  its clips; a dimension's score is the mean over those; imaging_quality is divided by 100 (we divide
  every clip score, so all numbers here are on VBench's 0-1 scale); dynamic_degree's per-clip
  True/False counts as 1/0.
* Total, quality and semantic scores (scripts/constant.py, scripts/cal_final_score.py): each dimension
  normalised by (score - min) / (max - min) and weighted (dynamic_degree 0.5, others 1); quality = the
  weighted mean over its 7 dimensions, semantic over its 9, total = (4 quality + semantic) / 5. Given
  only when every dimension of that score ran.

Not done here (docs/evaluation.md): the slow-fast branch of subject/background consistency (with
--dev_flag VBench-Long fuses in-clip scores 0.5/0.5 with a clip-to-clip score from DINOv2 / DreamSim;
without it, the in-clip score alone, which is what this gives) and the RAFT static filter that
evaluate_long.sh applies to temporal_flickering in the standard suite.

Outputs of `read`: vbench.json (eval.report picks up <run>/vbench/vbench.json: per video the clip scores,
their mean and their drift slope against time; per method the VBench-Long score of each dimension and
the total / quality / semantic scores), leaderboard/<method>_eval_results.json (VBench's result format,
{dimension: [score, [{video_path, video_results}, ...]]}, the files the leaderboard's cal_final_score.py
reads) and vbench.md (a table beside the paper's 20 s numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hiar.atomic import atomic_path
from hiar.drift import fit_slope
from hiar.outputs import exit_code
from hiar.scoring import check_readable, videos_to_score
from hiar.video import read_video, video_fps, write_video
from hiar.videoset import PROMPTS_FILE

REPO = Path(__file__).resolve().parents[1]
CLIPS_FILE = "clips.json"
INFO_FILE = "vbench_info.json"  # VBench's full-info format, what launch/vbench_worker.py score reads
PLAN_FILE = "plan.json"
CLIP_SECONDS = 2.0  # VBench-Long's clip length for custom prompts (VBenchLong.preprocess: duration = 2)
SCENE_THRESHOLD = 35.0  # VBenchLong.preprocess(threshold=35.0) -> ContentDetector(threshold)

# VBench's 16 dimensions in its order (VBench.build_full_dimension_list) and VBench-Long's clip lengths
# (vbench2_beta_long/configs/clip_length_mix.yaml), seconds.
CLIP_LENGTHS = {
    "subject_consistency": 2.0, "background_consistency": 2.0, "aesthetic_quality": 2.0, "imaging_quality": 2.0,
    "object_class": 2.0, "multiple_objects": 2.0, "color": 2.0, "spatial_relationship": 2.0, "scene": 2.0,
    "temporal_style": 10.0, "overall_consistency": 10.0, "human_action": 10.0, "temporal_flickering": 2.0,
    "motion_smoothness": 2.0, "dynamic_degree": 2.0, "appearance_style": 2.0,
}
DIMENSIONS = list(CLIP_LENGTHS)
# dimensions that read auxiliary_info of the standard suite (VBench.check_dimension_requires_extra_info)
NEEDS_AUX = {"object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"}

# The leaderboard's scores (scripts/constant.py): (min, max) for normalising, weights, the two groups.
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT = {d: 0.5 if d == "dynamic_degree" else 1.0 for d in DIMENSIONS}
QUALITY = ["subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree"]
SEMANTIC = ["object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency"]
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1

# The weights each dimension loads in VBench's local mode (vbench/utils.py: init_submodules; aesthetic
# head: vbench/aesthetic_quality.py), relative to VBENCH_CACHE_DIR. VBench would wget a missing one; we
# skip the dimension instead unless VBENCH_DOWNLOAD=1. GRiT (object_class, multiple_objects, color,
# spatial_relationship) and Tag2Text (scene) also load bert-base-uncased from the Hugging Face cache.
WEIGHT_FILES = {
    "subject_consistency": ["dino_model/facebookresearch_dino_main/hubconf.py",
                            "dino_model/dino_vitbase16_pretrain.pth"],
    "background_consistency": ["clip_model/ViT-B-32.pt"],
    "aesthetic_quality": ["clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"],
    "imaging_quality": ["pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"],
    "object_class": ["grit_model/grit_b_densecap_objectdet.pth"],
    "multiple_objects": ["grit_model/grit_b_densecap_objectdet.pth"],
    "color": ["grit_model/grit_b_densecap_objectdet.pth"],
    "spatial_relationship": ["grit_model/grit_b_densecap_objectdet.pth"],
    "scene": ["caption_model/tag2text_swin_14m.pth"],
    "temporal_style": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
    "overall_consistency": ["ViCLIP/ViClip-InternVid-10M-FLT.pth"],
    "human_action": ["umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth"],
    "temporal_flickering": [],
    "motion_smoothness": ["amt_model/amt-s.pth"],
    "dynamic_degree": ["raft_model/models/raft-things.pth"],
    "appearance_style": ["clip_model/ViT-B-32.pt"],
}

# The HiAR paper's VBench numbers for 20 s videos (Wan2.1-T2V-1.3B students).
PAPER_20S = {
    "HiAR": {"total": 0.821, "quality": 0.846, "semantic": 0.723, "dynamic_degree": 0.686},
    "Self-Forcing": {"total": 0.805, "quality": 0.829, "semantic": 0.708, "dynamic_degree": 0.542},
}


# -- the protocol ---------------------------------------------------------------------------------------


def clip_frames(fps: float, seconds: float) -> int:
    """Frames in one clip: int(fps) * int(seconds), as split_video_into_clips computes it."""
    frames = int(fps) * int(seconds)
    if frames < 1:
        raise ValueError(f"a clip of {seconds:g} s at {fps:g} fps has no frame: VBench-Long cuts int(fps) * "
                         f"int(seconds) frames, so give at least 1 s (it uses {CLIP_SECONDS:g})")
    return frames


def clip_bounds(num_frames: int, clip_frames: int) -> list[tuple[int, int]]:
    """[start, end) frames of VBench-Long's clips of one video or scene (module docstring)."""
    if clip_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {clip_frames}")
    if num_frames < clip_frames:
        return [(0, num_frames)]
    bounds = [(i * clip_frames, (i + 1) * clip_frames) for i in range(num_frames // clip_frames)]
    if num_frames % clip_frames:
        bounds.append((num_frames - clip_frames, num_frames))
    return bounds


def standard_suite(path: str | Path | None) -> dict[str, dict]:
    """VBench's standard prompt suite (vbench/VBench_full_info.json) as {prompt: {"dimension": [...],
    "auxiliary_info": {...}}}; a prompt listed twice gets the union."""
    if path is None:
        return {}
    suite: dict[str, dict] = {}
    for entry in _json(Path(path)):
        known = suite.setdefault(entry["prompt_en"], {"dimension": [], "auxiliary_info": {}})
        known["dimension"] += [d for d in entry["dimension"] if d not in known["dimension"]]
        known["auxiliary_info"].update(entry.get("auxiliary_info", {}))
    return suite


def video_protocol(prompt: str, suite: dict[str, dict], dimensions: list[str]) -> tuple[str, list[str], dict, float]:
    """(mode, dimensions to score, auxiliary_info, clip seconds) of one video."""
    if prompt in suite:
        own = suite[prompt]["dimension"]
        return ("standard", [d for d in dimensions if d in own], suite[prompt]["auxiliary_info"],
                max(CLIP_LENGTHS[d] for d in own))
    return "custom", [d for d in dimensions if d not in NEEDS_AUX], {}, CLIP_SECONDS


def plan_dimensions(dimensions: list[str], cache_dir: str | Path | None, download: bool = False
                    ) -> tuple[list[str], dict[str, str]]:
    """(dimensions that can run, {skipped dimension: why}): a dimension runs when its weights are in
    cache_dir (WEIGHT_FILES), or when VBench may download them."""
    unknown = [d for d in dimensions if d not in CLIP_LENGTHS]
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {', '.join(unknown)}: choose from {', '.join(DIMENSIONS)}")
    run, skipped = [], {}
    for dim in dict.fromkeys(dimensions):
        missing = [f for f in WEIGHT_FILES[dim] if not (cache_dir and (Path(cache_dir) / f).is_file())]
        if missing and not download:
            skipped[dim] = (f"needs {Path(cache_dir or '$VBENCH_CACHE_DIR') / missing[0]} (VBench's weights; place "
                            "them there, or set VBENCH_DOWNLOAD=1 to let VBench fetch them)")
        else:
            run.append(dim)
    return run, skipped


def write_clips(videos: str | Path, out: str | Path, clip_seconds: float | None = None,
                full_info: str | Path | None = None, scenes: str | Path | None = None,
                dimensions: list[str] | None = None, cache_dir: str | Path | None = None,
                download: bool = False) -> dict:
    """Cut every video of `videos` (hiar.videoset layouts) into VBench-Long's clips under out/<method>/,
    with prompts.json, clips.json (where each clip comes from) and vbench_info.json (what VBench scores);
    out/plan.json says which dimensions run and why the others do not. The clips are derived files: a
    rerun replaces them."""
    if clip_seconds is not None and not clip_seconds > 0:
        raise ValueError(f"--clip_seconds={clip_seconds}: give a positive length (VBench-Long uses {CLIP_SECONDS:g})")
    methods, out, root = videos_to_score(videos), Path(out), Path(videos)
    check_readable(methods)
    suite = standard_suite(full_info)
    cuts = _json(Path(scenes)) if scenes else {}
    run, skipped = plan_dimensions(dimensions or ["temporal_flickering"], cache_dir, download)
    written = {}
    for method, items in methods.items():
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        prompts, clips, info = {}, {}, []
        for item in tqdm(items, desc=f"clips ({method})", unit="video"):
            frames, fps = read_video(item.path), video_fps(item.path)
            mode, dims, aux, seconds = video_protocol(item.prompt, suite, run)
            seconds = clip_seconds or seconds
            n = clip_frames(fps, seconds)
            scene_list = cuts.get(str(item.path.relative_to(root)), [])
            parts = [(f"{item.name}-Scene-{k}", k, a, b) for k, (a, b) in enumerate(scene_list)] or \
                [(item.name, None, 0, len(frames))]
            names = []
            for group, scene, a0, b0 in parts:
                bounds = clip_bounds(b0 - a0, n)
                for i, (a, b) in enumerate(bounds):
                    name = f"{group}_full.mp4" if b0 - a0 < n else f"{group}_{i:03d}.mp4"
                    write_video(folder / name, frames[a0 + a:a0 + b], fps)
                    prompts[name] = item.prompt
                    clips[name] = {"video": item.name, "group": group, "scene": scene, "clip": i, "start": a0 + a,
                                   "end": a0 + b, "frames": len(frames), "fps": fps, "seconds": seconds, "mode": mode}
                    names.append(name)
            if dims:
                entry = {"prompt_en": item.prompt, "dimension": dims,
                         "video_list": [str((folder / name).resolve()) for name in names]}
                if aux:
                    entry["auxiliary_info"] = {d: aux[d] for d in dims if d in aux}
                info.append(entry)
        for stale in set(p.name for p in folder.glob("*.mp4")) - set(clips):
            (folder / stale).unlink()  # clips of an earlier run's videos
        for name, listing in ((PROMPTS_FILE, prompts), (CLIPS_FILE, clips), (INFO_FILE, info)):
            with atomic_path(folder / name) as tmp:
                tmp.write_text(json.dumps(listing, indent=1))
        written[method] = clips
    with atomic_path(out / PLAN_FILE) as tmp:
        tmp.write_text(json.dumps({"run": run, "skipped": skipped, "download": download}, indent=1))
    return written


# -- scores ---------------------------------------------------------------------------------------------


def leaderboard_scores(dims: dict[str, float]) -> dict:
    """Quality, semantic and total score (module docstring) of {dimension: score}; a score whose
    dimensions did not all run is None, and `missing` names what it lacks."""
    def group(names):
        if any(d not in dims or dims[d] is None or math.isnan(dims[d]) for d in names):
            return None
        norm = {d: (dims[d] - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) * DIM_WEIGHT[d] for d in names}
        return sum(norm.values()) / sum(DIM_WEIGHT[d] for d in names)

    quality, semantic = group(QUALITY), group(SEMANTIC)
    total = None if quality is None or semantic is None else \
        (quality * QUALITY_WEIGHT + semantic * SEMANTIC_WEIGHT) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"quality": quality, "semantic": semantic, "total": total,
            "missing": [d for d in DIMENSIONS if d not in dims]}


def read_results(clips: str | Path, results: str | Path, clip_seconds: float | None = None) -> dict:
    """VBench's per-clip scores -> per video (clip scores, mean, slope), per long video or scene (VBench-
    Long's unit), per dimension (VBench-Long's score) and the leaderboard's scores, per method."""
    clips, results = Path(clips), Path(results)
    if not results.is_dir():
        raise ValueError(f"VBench results folder {results} does not exist: run launch/vbench.sh first")
    plan = _json(clips / PLAN_FILE) if (clips / PLAN_FILE).is_file() else {}
    out: dict = {"clip_seconds": clip_seconds or CLIP_SECONDS, "clip_seconds_per_dimension": CLIP_LENGTHS,
                 "dimensions": [], "methods": {}, "skipped": [], "skipped_dimensions": plan.get("skipped", {})}
    for method_dir in sorted(d for d in results.iterdir() if d.is_dir()):
        found = sorted(method_dir.glob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
        manifest_path = clips / method_dir.name / CLIPS_FILE
        if not found or not manifest_path.is_file():
            raise ValueError(f"{method_dir}: no *_eval_results.json, or no {manifest_path}")
        manifest, raw = _json(manifest_path), _json(found[-1])  # the newest run
        if not isinstance(raw, dict) or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[1], list)
                                                for v in raw.values()):
            raise ValueError(f"{found[-1]} is not VBench's {{dimension: [mean, [per clip]]}} result: point --results "
                             "at the folder launch/vbench.sh wrote")
        videos: dict = {}
        groups: dict = {}
        for dim, (_, per_clip) in raw.items():
            scale = 0.01 if dim == "imaging_quality" else 1.0  # MUSIQ's 0-100 (reorganize_clips_results: / 100)
            for entry in per_clip:
                score = entry.get("video_results") if isinstance(entry, dict) else None
                if isinstance(score, bool):
                    score = float(score)  # dynamic_degree: is the clip dynamic
                if not isinstance(score, (int, float)) or Path(str(entry.get("video_path"))).name not in manifest:
                    out["skipped"].append(f"{method_dir.name}/{dim}: {str(entry)[:80]}")
                    continue
                clip = manifest[Path(entry["video_path"]).name]
                videos.setdefault(clip["video"], {}).setdefault(dim, []).append((clip, float(score) * scale))
                groups.setdefault(dim, {}).setdefault(clip.get("group", clip["video"]), []).append(float(score) * scale)
            if dim not in out["dimensions"]:
                out["dimensions"].append(dim)
        per_video = {}
        for name, dims in videos.items():
            per_video[name] = {}
            for dim, scored in dims.items():
                scored.sort(key=lambda cs: cs[0]["start"])
                t = np.array([(c["start"] + c["end"]) / 2 / c["frames"] for c, _ in scored])  # fraction of video
                y = np.array([s for _, s in scored])
                per_video[name][dim] = {"clips": y.tolist(), "clip_time": t.tolist(), "mean": float(y.mean()),
                                        "slope": fit_slope(t, y) if len(y) > 1 else math.nan}
        group_means = {dim: {g: float(np.mean(s)) for g, s in by.items()} for dim, by in groups.items()}
        summary = {dim: {"mean": float(np.mean(list(group_means[dim].values()))),
                         "slope": _nanmean([v[dim]["slope"] for v in per_video.values() if dim in v]),
                         "videos": sum(dim in v for v in per_video.values()), "groups": len(group_means[dim])}
                   for dim in out["dimensions"] if dim in group_means}
        out["methods"][method_dir.name] = {
            "videos": per_video, "summary": summary, "source": str(found[-1]),
            "scores": leaderboard_scores({d: s["mean"] for d, s in summary.items()}),
            "leaderboard": {dim: [summary[dim]["mean"], [{"video_path": f"{g}.mp4", "video_results": m}
                                                         for g, m in group_means[dim].items()]]
                            for dim in summary},
        }
    if not out["methods"]:
        raise ValueError(f"no method folders with results in {results}")
    return out


def markdown_table(result: dict) -> str:
    """The dimensions that ran, per method, beside the paper's 20 s numbers; the leaderboard's scores."""
    methods = list(result["methods"])
    papers = list(PAPER_20S)
    head = ["| | " + " | ".join(methods) + " | " + " | ".join(f"{p} (paper, 20 s)" for p in papers) + " |",
            "| --- |" + " --- |" * (len(methods) + len(papers))]

    def cell(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    rows = []
    for dim in [d for d in DIMENSIONS if d in result["dimensions"]] + ["quality", "semantic", "total"]:
        ours = [result["methods"][m]["summary"].get(dim, {}).get("mean") if dim in DIMENSIONS
                else result["methods"][m]["scores"][dim] for m in methods]
        rows.append(f"| {dim} | " + " | ".join(cell(v) for v in ours) + " | "
                    + " | ".join(cell(PAPER_20S[p].get(dim)) for p in papers) + " |")
    notes = ["", "Scores are VBench-Long's (clip means per video, then the mean over videos), 0-1. "
             "quality / semantic / total need all 7 / 9 / 16 dimensions; '-' where they did not all run. "
             "The paper's numbers are for 20 s Wan2.1-T2V-1.3B videos on VBench's prompts: a toy-world run "
             "measures the harness, not the paper's claim."]
    for dim, why in result.get("skipped_dimensions", {}).items():
        notes.append(f"* skipped {dim}: {why}")
    return "\n".join(head + rows + notes) + "\n"


def write_outputs(result: dict, out: str | Path) -> None:
    """vbench.json, vbench.md and leaderboard/<method>_eval_results.json beside it."""
    out = Path(out)
    files = {out: json.dumps(result, indent=1), out.with_suffix(".md"): markdown_table(result)}
    for method, v in result["methods"].items():
        files[out.parent / "leaderboard" / f"{method}_eval_results.json"] = json.dumps(v["leaderboard"], indent=1)
    for path, text in files.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): run that step of launch/vbench.sh again") from None


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


# -- end to end -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """prompts -> videos (python -m eval.rollout) -> launch/vbench.sh -> vbench.json, vbench.md, leaderboard/."""
    out = Path(args.out).absolute()  # launch/vbench.sh works from the repository root
    unknown = [d for d in args.dimensions if d not in CLIP_LENGTHS]
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {', '.join(unknown)}: choose from {', '.join(DIMENSIONS)}")
    if args.videos is None and not args.method:
        raise ValueError("give --method NAME=CHECKPOINT[:OVERRIDES] (one per method) to generate, or --videos")
    videos = Path(args.videos).absolute() if args.videos else out / "videos"
    env = {**os.environ, "HIAR_PYTHON": sys.executable,  # eval/ is no installed package: found from anywhere
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.videos is None:
        rollout = [sys.executable, "-m", "eval.rollout", "--out", str(out), "--config_path", args.config_path,
                   "--seconds", str(args.seconds), "--num_samples", str(args.num_samples), "--seed", str(args.seed),
                   *(["--data_path", args.data_path] if args.data_path else []),
                   *(["--device", args.device] if args.device else []),
                   *(["--overwrite"] if args.overwrite else []), *(f"--method={m}" for m in args.method)]
        _call(rollout, "generating the videos", env)  # in the caller's folder: its relative paths hold
    if args.use_semantic_splitting:
        env["SCENE_SPLIT"] = "1"
    _call(["bash", str(REPO / "launch" / "vbench.sh"), str(videos), str(out / "vbench"), *args.dimensions],
          "scoring with VBench", env)
    print((out / "vbench" / "vbench.md").read_text())


def _call(argv: list[str], what: str, env: dict) -> None:
    code = subprocess.run(argv, env=env).returncode
    if code != 0:
        raise OSError(f"{what} failed (exit code {code}): {' '.join(argv[:4])} ...; its message is above")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("run", help="prompts -> videos -> VBench / VBench-Long -> vbench.json, vbench.md")
    e.add_argument("--out", required=True, help="run folder: videos/, scores.json, vbench/")
    e.add_argument("--method", action="append", default=[], metavar="NAME=CKPT[:OVERRIDES]",
                   help="as eval.rollout's --method; several for several methods")
    e.add_argument("--videos", help="score these videos (eval.rollout's layout) instead of generating")
    e.add_argument("--config_path", default=str(REPO / "configs" / "toy" / "hiar.yaml"))
    e.add_argument("--data_path", help="one prompt a line (default: the config's runtime.prompts); VBench's "
                   "standard prompts get the standard suite's dimensions and clip lengths")
    e.add_argument("--seconds", type=float, default=20.0, help="video length (the paper's long videos: 20 s)")
    e.add_argument("--num_samples", type=int, default=1, help="videos per prompt (VBench's suite: 5)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", help="for generation (default: eval.rollout's)")
    e.add_argument("--dimensions", nargs="+", default=["temporal_flickering"], metavar="DIMENSION")
    e.add_argument("--use_semantic_splitting", action="store_true", help="VBench-Long's scene split first")
    e.add_argument("--overwrite", action="store_true", help="regenerate videos that exist (eval.rollout)")
    c = sub.add_parser("clips", help="split videos into VBench-Long clips, plan the dimensions")
    c.add_argument("--videos", required=True, help="folder of *.mp4 or <method>/*.mp4")
    c.add_argument("--out", required=True, help="clip folder (one subfolder a method)")
    c.add_argument("--clip_seconds", type=float, help="one clip length for every video (default: VBench-Long's)")
    c.add_argument("--full_info", help="VBench's VBench_full_info.json (launch/vbench_worker.py full_info)")
    c.add_argument("--scenes", help="scene cuts from launch/vbench_worker.py scenes")
    c.add_argument("--dimensions", nargs="+", default=["temporal_flickering"], metavar="DIMENSION")
    c.add_argument("--cache_dir", default=os.environ.get("VBENCH_CACHE_DIR"), help="VBench's weights folder")
    c.add_argument("--download", action="store_true", help="plan dimensions whose weights VBench would download")
    r = sub.add_parser("read", help="VBench result JSON -> vbench.json, vbench.md, leaderboard/")
    r.add_argument("--clips", required=True, help="the clip folder `clips` wrote")
    r.add_argument("--results", required=True, help="VBench output folder, one subfolder a method")
    r.add_argument("--out", required=True, help="vbench.json to write (vbench.md and leaderboard/ beside it)")
    r.add_argument("--clip_seconds", type=float)
    args = p.parse_args(argv)

    def work() -> None:
        if args.command == "run":
            return run(args)
        if args.command == "clips":
            written = write_clips(args.videos, args.out, args.clip_seconds, args.full_info, args.scenes,
                                  args.dimensions, args.cache_dir, args.download)
            plan = _json(Path(args.out) / PLAN_FILE)
            for dim, why in plan["skipped"].items():
                print(f"skipping {dim}: {why}", file=sys.stderr)
            print(f"wrote {sum(len(c) for c in written.values())} clips to {args.out}; VBench runs: "
                  f"{', '.join(plan['run']) or 'nothing'}")
            return None
        result = read_results(args.clips, args.results, args.clip_seconds)
        write_outputs(result, args.out)
        for method, v in result["methods"].items():
            print(method + ": " + ", ".join(f"{d} {s['mean']:.4f} (slope {s['slope']:+.4f})"
                                            for d, s in v["summary"].items()))
        print(f"wrote {args.out}, {Path(args.out).with_suffix('.md')} and {Path(args.out).parent / 'leaderboard'}/")
        return None

    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
