"""VBench and VBench-Long (eval/vbench.py, launch/vbench.sh): VBench's file names, the clip and scene split
and the aggregation on constructed videos whose boundaries are known, and, where VBench's own environment
(.venv-vbench) is built, the real VBench (temporal_flickering, offline) end to end."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors import safe_open

import inference
from eval import vbench
from eval.vbench import clip_bounds, leaderboard_scores, read_results, write_clips
from hiar.drift import frame_l1
from hiar.video import read_video, write_video
from hiar.videoset import STEM_MAX, find_videos, prompt_from_filename, record_prompts, video_stem

REPO = Path(__file__).resolve().parents[1]
VBENCH_VENV = Path(os.environ.get("VBENCH_VENV", REPO / ".venv-vbench"))
needs_vbench = pytest.mark.skipif(
    not (VBENCH_VENV / ".vbench-ready").is_file(),
    reason=f"VBench's own environment ({VBENCH_VENV}) is not built: `bash launch/vbench.sh VIDEOS OUT` builds it "
           "(about 2 minutes and 6 GB here; requirements-vbench.txt)")


def texture(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 [H, W, 3]), full contrast."""
    noise = np.random.default_rng(seed).uniform(0, 255, (size, size, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    return ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)


def drifting(frames: int, seed: int = 0, size: int = 32) -> np.ndarray:
    image = texture(size, seed)
    return np.stack([np.roll(image, i, axis=1) for i in range(frames)])


def vbench_python(code: str, *args: str) -> str:
    """Run `code` in VBench's environment; its stdout."""
    return subprocess.run([str(VBENCH_VENV / "bin" / "python"), "-c", code, *args], check=True, capture_output=True,
                          text=True, cwd=REPO, timeout=300).stdout


# -- file names ----------------------------------------------------------------------------------------


def test_file_names_are_vbench_names_with_only_forbidden_characters_mapped(tmp_path):
    for prompt in ["a cat's (tiny) hat, 100% wool; \"quoted\" *?<>|:\\ and tabs\t", "über café 雨", " x "]:
        assert video_stem(prompt, 3) == f"{prompt}-3"  # verbatim: VBench's f"{prompt}-{index}"
        assert prompt_from_filename(Path(video_stem(prompt, 3) + ".mp4")) == prompt
    slash = "AC/DC on a 1/2 inch stage"
    assert video_stem(slash, 0) == "AC\u2215DC on a 1\u22152 inch stage-0"
    assert prompt_from_filename(Path(video_stem(slash, 0) + ".mp4")) == slash
    long = "a very long prompt é " * 20  # 420 bytes: past the 255-byte name limit
    stem = video_stem(long, 4)
    assert stem.endswith(f"~{hashlib.sha256(long.encode()).hexdigest()[:12]}-4")
    assert STEM_MAX - 4 < len(stem.encode()) <= STEM_MAX  # cut at a character boundary
    assert long.startswith(stem.split("~")[0])  # whole characters of the prompt, then the hash
    longest = f"{stem} (9999).latents.safetensors.partial"
    (tmp_path / longest).write_bytes(b"")  # the file system takes the longest name a writer derives
    assert video_stem(long, 4) != video_stem(long + "!", 4)


@needs_vbench
def test_vbench_standard_prompts_round_trip(tmp_path):
    # Every prompt of VBench's standard suite (the 946 entries of vbench/VBench_full_info.json, which
    # VBench looks up as f"{prompt}-{index}.mp4") gets exactly that name, the file system takes it, and
    # both our reader and VBench's own get_prompt_from_filename give the prompt back.
    path = subprocess.run([str(VBENCH_VENV / "bin" / "python"), "launch/vbench_worker.py", "full_info"], check=True,
                          capture_output=True, text=True, cwd=REPO).stdout.strip()
    entries = json.loads(Path(path).read_text())
    assert len(entries) == 946
    prompts = sorted({e["prompt_en"] for e in entries})
    names = {}
    for prompt in prompts:
        for index in range(5):
            name = video_stem(prompt, index) + ".mp4"
            assert name == f"{prompt}-{index}.mp4"
            assert prompt_from_filename(Path(name)) == prompt
            names[name] = prompt
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert len(list(tmp_path.iterdir())) == len(names) == 5 * len(prompts)
    listing = tmp_path.parent / f"{tmp_path.name}-names.json"
    listing.write_text(json.dumps(list(names)))
    theirs = json.loads(vbench_python("import json, sys; from vbench.utils import get_prompt_from_filename as f; "
                                      "print(json.dumps({n: f(n) for n in json.load(open(sys.argv[1]))}))",
                                      str(listing)))
    assert theirs == names


def test_inference_names_videos_as_vbench_and_writes_the_manifest(tmp_path):
    # --extended_prompt_path: generated from the extended prompt, named (and listed) by the original
    prompts, extended = tmp_path / "p.txt", tmp_path / "e.txt"
    long = "a red circle moving left on a dark blue background, " * 3 + "and AC/DC (live)"  # > 100 characters
    prompts.write_text(f"{long}\ncat\n")
    extended.write_text("a red circle moving left on a dark blue background\na yellow square moving up\n")
    out = tmp_path / "out"
    assert inference.main(["--config_path", "tiny", "--num_output_frames", "3", "--num_samples", "2", "--save_latents",
                           "--data_path", str(prompts), "--extended_prompt_path", str(extended),
                           "--output_folder", str(out)]) == 0
    mapped = long.replace("/", "\u2215")
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted([f"{mapped}-0.mp4", f"{mapped}-1.mp4", "cat-0.mp4",
                                                                "cat-1.mp4"])
    assert json.loads((out / "prompts.json").read_text()) == {f"{mapped}-0.mp4": long, f"{mapped}-1.mp4": long,
                                                              "cat-0.mp4": "cat", "cat-1.mp4": "cat"}
    with safe_open(str(out / "cat-1.latents.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == "cat" and meta["extended_prompt"] == "a yellow square moving up"
    (listed,) = find_videos(out).values()
    assert {v.path.name: v.prompt for v in listed}[f"{mapped}-0.mp4"] == long
    record_prompts(out, {"other.mp4": "another run's"})  # a second writer adds, never drops
    assert len(json.loads((out / "prompts.json").read_text())) == 5


# -- VBench-Long's protocol ------------------------------------------------------------------------------


def test_clips_split_like_vbench_long():
    assert clip_bounds(50, 16) == [(0, 16), (16, 32), (32, 48), (34, 50)]  # the last one ends at the end
    assert clip_bounds(32, 16) == [(0, 16), (16, 32)]
    assert clip_bounds(10, 16) == [(0, 10)]  # shorter than a clip: whole
    assert vbench.clip_frames(8.0, 2) == 16 and vbench.clip_frames(16.9, 2.5) == 32  # int(fps) * int(seconds)
    with pytest.raises(ValueError, match="no frame"):
        vbench.clip_frames(8, 0.5)


def _videos(folder: Path, frames: int = 48) -> None:
    """One method, one video of `frames` textured frames drifting right (8 fps)."""
    write_video(folder / "m" / "000-0.mp4", drifting(frames), 8)
    (folder / "m" / "prompts.json").write_text(json.dumps({"000-0.mp4": "a drifting texture"}))


def test_vbench_results_are_read_back_per_video(tmp_path):
    _videos(tmp_path / "videos")
    clips = write_clips(tmp_path / "videos", tmp_path / "clips")["m"]
    assert [(c["start"], c["end"]) for c in clips.values()] == [(0, 16), (16, 32), (32, 48)]
    assert json.loads((tmp_path / "clips" / "m" / "prompts.json").read_text())["000-0_001.mp4"] == "a drifting texture"
    # VBench's result file: {dimension: [mean, [{"video_path", "video_results"}, ...]]}, clip scores falling
    # 0.1 a clip; clip centres lie 1/3 of the video apart, so the slope over the video is -0.3.
    scores = [0.9, 0.8, 0.7]
    raw = {"temporal_flickering": [0.8, [{"video_path": str(tmp_path / "clips" / "m" / name), "video_results": s}
                                         for name, s in zip(sorted(clips), scores)]]}
    (tmp_path / "results" / "m").mkdir(parents=True)
    (tmp_path / "results" / "m" / "results_x_eval_results.json").write_text(json.dumps(raw))
    (tmp_path / "results" / "m" / "results_x_full_info.json").write_text("[]")  # VBench writes this too
    got = read_results(tmp_path / "clips", tmp_path / "results")
    video = got["methods"]["m"]["videos"]["000-0"]["temporal_flickering"]
    assert video["clips"] == scores and video["mean"] == pytest.approx(0.8)
    assert video["slope"] == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="does not exist"):
        read_results(tmp_path / "clips", tmp_path / "nowhere")


SCENES = [(1, 30), (2, 30), (3, 40)]  # (texture seed, frames) of the constructed video's three scenes


def _scene_video(path: Path) -> None:
    write_video(path, np.concatenate([drifting(n, seed, 64) for seed, n in SCENES]), 8)


def test_vbench_long_protocol_on_constructed_videos(tmp_path):
    # m/cuts-0.mp4: three scenes of 30, 30 and 40 frames at 8 fps, cut as the scene split reports them;
    # m/<standard prompt>-0.mp4: a prompt of VBench's suite whose dimensions include overall_consistency
    # (10 s clips: 80 frames); m/custom-0.mp4: any other prompt, 2 s clips (16 frames).
    videos = tmp_path / "videos" / "m"
    _scene_video(videos / "cuts-0.mp4")
    write_video(videos / "a standard prompt-0.mp4", drifting(100), 8)
    write_video(videos / "custom-0.mp4", drifting(40), 8)
    suite = [{"prompt_en": "a standard prompt", "dimension": ["overall_consistency", "temporal_flickering"]},
             {"prompt_en": "a colour prompt", "dimension": ["color"], "auxiliary_info": {"color": {"color": "red"}}}]
    (tmp_path / "full_info.json").write_text(json.dumps(suite))
    (tmp_path / "scenes.json").write_text(json.dumps({"m/cuts-0.mp4": [[0, 30], [30, 60], [60, 100]],
                                                      "m/custom-0.mp4": []}))
    clips = write_clips(tmp_path / "videos", tmp_path / "clips", full_info=tmp_path / "full_info.json",
                        scenes=tmp_path / "scenes.json", dimensions=["temporal_flickering", "color"])["m"]
    bounds = {name: (c["start"], c["end"]) for name, c in clips.items()}
    assert bounds == {
        "cuts-0-Scene-0_000.mp4": (0, 16), "cuts-0-Scene-0_001.mp4": (14, 30),
        "cuts-0-Scene-1_000.mp4": (30, 46), "cuts-0-Scene-1_001.mp4": (44, 60),
        "cuts-0-Scene-2_000.mp4": (60, 76), "cuts-0-Scene-2_001.mp4": (76, 92), "cuts-0-Scene-2_002.mp4": (84, 100),
        "a standard prompt-0_000.mp4": (0, 80), "a standard prompt-0_001.mp4": (20, 100),
        "custom-0_000.mp4": (0, 16), "custom-0_001.mp4": (16, 32), "custom-0_002.mp4": (24, 40)}
    assert len(read_video(tmp_path / "clips" / "m" / "cuts-0-Scene-0_001.mp4")) == 16
    frames = read_video(videos / "cuts-0.mp4")
    first = read_video(tmp_path / "clips" / "m" / "cuts-0-Scene-1_000.mp4")[0].astype(float)  # re-encoded: near
    assert np.abs(first - frames[30]).mean() < 3 < 20 < np.abs(first - frames[29]).mean()  # scene 1's first frame
    # color needs the suite's auxiliary_info: skipped for custom prompts; weights are missing, so planned out
    plan = json.loads((tmp_path / "clips" / "plan.json").read_text())
    assert plan["run"] == ["temporal_flickering"] and "grit_b_densecap_objectdet.pth" in plan["skipped"]["color"]
    info = json.loads((tmp_path / "clips" / "m" / "vbench_info.json").read_text())
    assert [(e["prompt_en"], e["dimension"], len(e["video_list"])) for e in info] == [
        ("a standard prompt", ["temporal_flickering"], 2), ("custom", ["temporal_flickering"], 3),
        ("cuts", ["temporal_flickering"], 7)]
    # Aggregation: each scene / long video is the mean of its clips, the dimension the mean over them.
    score = {name: 0.5 + 0.01 * i for i, name in enumerate(sorted(clips))}
    raw = {"temporal_flickering": [0.0, [{"video_path": str(tmp_path / "clips" / "m" / n), "video_results": s}
                                         for n, s in score.items()]],
           "imaging_quality": [0.0, [{"video_path": str(tmp_path / "clips" / "m" / "custom-0_000.mp4"),
                                      "video_results": 64.0}]],
           "dynamic_degree": [0.0, [{"video_path": str(tmp_path / "clips" / "m" / n), "video_results": n < "b"}
                                    for n in ("a standard prompt-0_000.mp4", "a standard prompt-0_001.mp4",
                                              "custom-0_000.mp4")]]}
    (tmp_path / "results" / "m").mkdir(parents=True)
    (tmp_path / "results" / "m" / "r_eval_results.json").write_text(json.dumps(raw))
    got = read_results(tmp_path / "clips", tmp_path / "results")["methods"]["m"]

    def mean_of(prefix):
        return np.mean([s for n, s in score.items() if n.startswith(prefix)])

    units = ["a standard prompt-0", "custom-0", "cuts-0-Scene-0", "cuts-0-Scene-1", "cuts-0-Scene-2"]
    assert got["summary"]["temporal_flickering"]["mean"] == pytest.approx(np.mean([mean_of(u + "_") for u in units]))
    assert got["summary"]["temporal_flickering"]["groups"] == 5 and got["summary"]["temporal_flickering"]["videos"] == 3
    assert got["videos"]["cuts-0"]["temporal_flickering"]["mean"] == pytest.approx(mean_of("cuts-0"))
    assert got["summary"]["imaging_quality"]["mean"] == pytest.approx(0.64)  # MUSIQ's 0-100 / 100
    assert got["summary"]["dynamic_degree"]["mean"] == pytest.approx(0.5)  # (1 + 1) / 2 clips, 0 / 1 clip
    board = got["leaderboard"]["temporal_flickering"]
    assert board[0] == got["summary"]["temporal_flickering"]["mean"]
    assert sorted(v["video_path"] for v in board[1]) == sorted(u + ".mp4" for u in units)


def test_leaderboard_scores_follow_vbench_normalisation():
    top = {d: hi for d, (lo, hi) in vbench.NORMALIZE.items()}
    assert leaderboard_scores(top) == {"quality": 1.0, "semantic": 1.0, "total": 1.0, "missing": []}
    mid = {d: (lo + hi) / 2 for d, (lo, hi) in vbench.NORMALIZE.items()} | {"dynamic_degree": 1.0}
    # quality: six dimensions at 0.5 and dynamic_degree at 1, weighted 0.5: (6 * 0.5 + 0.5) / 6.5
    got = leaderboard_scores(mid)
    assert got["quality"] == pytest.approx(3.5 / 6.5) and got["semantic"] == pytest.approx(0.5)
    assert got["total"] == pytest.approx((4 * 3.5 / 6.5 + 0.5) / 5)
    partial = leaderboard_scores({"temporal_flickering": 0.98})
    assert partial["total"] is None and partial["quality"] is None and "dynamic_degree" in partial["missing"]


# -- the real VBench -------------------------------------------------------------------------------------


@needs_vbench
def test_vbench_temporal_flickering_runs_in_its_environment(tmp_path):
    # VBench's temporal_flickering is (255 - mean |frame t+1 - frame t|) / 255 per clip: our frame_l1 of the
    # same clip files must give the same number.
    _videos(tmp_path / "videos", frames=40)
    env = {**os.environ, "HIAR_PYTHON": sys.executable, "VBENCH_VENV": str(VBENCH_VENV)}
    subprocess.run(["bash", str(REPO / "launch/vbench.sh"), str(tmp_path / "videos"), str(tmp_path / "vb"),
                    "temporal_flickering"], check=True, env=env, cwd=REPO, timeout=300)
    got = json.loads((tmp_path / "vb" / "vbench.json").read_text())["methods"]["m"]["videos"]["000-0"]
    ours = []
    for clip in sorted((tmp_path / "vb" / "clips" / "m").glob("*.mp4")):
        frames = read_video(clip)
        ours.append(1 - np.mean([frame_l1(a, b) for a, b in zip(frames, frames[1:])]) / 255)
    assert got["temporal_flickering"]["clips"] == pytest.approx(ours, abs=2e-3)


@needs_vbench
def test_scene_split_finds_the_constructed_cuts(tmp_path):
    _scene_video(tmp_path / "v" / "cuts-0.mp4")
    write_video(tmp_path / "v" / "still-0.mp4", drifting(40), 8)
    subprocess.run([str(VBENCH_VENV / "bin" / "python"), "launch/vbench_worker.py", "scenes", str(tmp_path / "v"),
                    str(tmp_path / "scenes.json"), "35"], check=True, cwd=REPO, timeout=300)
    assert json.loads((tmp_path / "scenes.json").read_text()) == {"cuts-0.mp4": [[0, 30], [30, 60], [60, 100]],
                                                                  "still-0.mp4": []}


@needs_vbench
def test_end_to_end_on_two_toy_videos(tmp_path):
    # python -m eval.vbench run: two prompts -> the toy default student's videos (2 s) -> VBench's
    # temporal_flickering (no weights needed) -> vbench.json, the leaderboard's JSON and the table; a
    # dimension without its weights is skipped, saying which file it needs.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a dark blue background\n"
                       "a yellow square moving up on a black background\n")
    env = {**os.environ, "VBENCH_VENV": str(VBENCH_VENV), "VBENCH_CACHE_DIR": str(tmp_path / "no_weights")}
    subprocess.run([sys.executable, "-m", "eval.vbench", "run", "--out", str(tmp_path / "run"), "--seconds", "2",
                    "--data_path", str(prompts), "--method", "hiar=checkpoints/toy_hiar.safetensors",
                    "--dimensions", "temporal_flickering", "dynamic_degree"], check=True, env=env, cwd=REPO,
                   timeout=600)
    out = tmp_path / "run" / "vbench"
    result = json.loads((out / "vbench.json").read_text())
    hiar = result["methods"]["hiar"]
    assert sorted(hiar["videos"]) == ["000-0", "001-0"] and result["dimensions"] == ["temporal_flickering"]
    for name, video in hiar["videos"].items():
        ours = []
        for clip in sorted((out / "clips" / "hiar").glob(f"{name}_*.mp4")):
            frames = read_video(clip)
            ours.append(1 - np.mean([frame_l1(a, b) for a, b in zip(frames, frames[1:])]) / 255)
        assert video["temporal_flickering"]["clips"] == pytest.approx(ours, abs=2e-3)
    assert "raft-things.pth" in result["skipped_dimensions"]["dynamic_degree"]
    board = json.loads((out / "leaderboard" / "hiar_eval_results.json").read_text())
    assert board["temporal_flickering"][0] == pytest.approx(hiar["summary"]["temporal_flickering"]["mean"])
    table = (out / "vbench.md").read_text()
    assert "| temporal_flickering | " in table and "| total | - | 0.8210 | 0.8050 |" in table
