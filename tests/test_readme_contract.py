"""The published HiAR README's commands (github.com/Jacky-hate/HiAR) run here as pasted, except paths and
sizes: the toy config and its embedded student instead of the Wan ones, a few latent frames, two
processes instead of four GPUs."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import inference
from hiar.video import read_video
from scripts import pipeline_parallel_inference as front

ROOT = Path(__file__).resolve().parent.parent

# Verbatim from the published README ("2. Inference" and "Pipelined Parallel Inference").
SHORT = """python inference.py \\
    --config_path configs/hiar.yaml \\
    --checkpoint_path ckpts/hiar.pt \\
    --data_path data/prompts.txt \\
    --output_folder outputs/ \\
    --num_output_frames 21 \\
    --use_ema \\
    --inference_method timestep_first"""
LONG = SHORT.replace("--num_output_frames 21", "--num_output_frames 81")
PIPELINE = """torchrun --nproc_per_node=4 \\
    scripts/pipeline_parallel_inference.py \\
    --config_path configs/hiar.yaml \\
    --checkpoint_path ckpts/hiar.pt \\
    --prompt "A cat sitting on a windowsill watching the rain fall outside" \\
    --output_path outputs/pipeline_output.mp4 \\
    --num_output_frames 81"""
PROMPTS = (ROOT / "data" / "prompts.txt").read_text().split("\n")
TOY = ["--config_path", "configs/toy/hiar.yaml"]


def adapted(command: str, out: Path, frames: dict[str, str]) -> list[str]:
    """The command with our paths and sizes; the launcher becomes this interpreter."""
    for old, new in [("configs/hiar.yaml", "configs/toy/hiar.yaml"),
                     ("ckpts/hiar.pt", "checkpoints/toy_hiar.safetensors"), ("outputs/", f"{out}/"),
                     *((f"--num_output_frames {a}", f"--num_output_frames {b}") for a, b in frames.items())]:
        assert old in command
        command = command.replace(old, new)
    argv = shlex.split(command.replace("\\\n", " "))  # a backslash-newline continues the line, as in bash
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    assert argv[:2] == ["torchrun", "--nproc_per_node=4"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv[2:]]


def run(argv: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


@pytest.mark.parametrize("command,frames", [(SHORT, {"21": "6"}), (LONG, {"81": "9"})], ids=["short", "long"])
def test_inference_commands(tmp_path, command, frames):
    run(adapted(command, tmp_path, frames))
    for prompt in filter(None, (p.strip() for p in PROMPTS)):
        video = read_video(tmp_path / f"{prompt[:100]}-0.mp4")  # the published script's names
        assert len(video) == int(next(iter(frames.values())))


def test_pipeline_command(tmp_path):
    out = run(adapted(PIPELINE, tmp_path, {"81": "9"}))
    assert "2-stage pipeline" in out
    assert len(read_video(tmp_path / "pipeline_output.mp4")) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline_output.mp4"]  # exactly that file


def test_download_step_uses_the_current_cli():
    script = (ROOT / "launch" / "download_weights.sh").read_text()
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B" in script
    assert "hf download jackyhate/HiAR hiar.pt --local-dir ckpts" in script  # -> ckpts/hiar.pt


def run_download_script(tmp_path, clis: list[str]) -> subprocess.CompletedProcess:
    """launch/download_weights.sh in a copy of the repository's layout with no .venv, on a PATH holding only
    `dirname` and the named fake CLIs (each prints the command it was given instead of downloading)."""
    (tmp_path / "launch").mkdir(parents=True)
    (tmp_path / "launch" / "download_weights.sh").write_text((ROOT / "launch" / "download_weights.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    for cli in clis:
        (bin_dir / cli).write_text(f'#!/bin/sh\necho "{cli} $*"\n')
        (bin_dir / cli).chmod(0o755)
    return subprocess.run(["/bin/bash", str(tmp_path / "launch" / "download_weights.sh"), "inference"],
                          env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30)


def test_download_step_falls_back_to_huggingface_cli_and_says_what_to_install(tmp_path):
    proc = run_download_script(tmp_path / "hf", ["hf", "huggingface-cli"])
    assert proc.returncode == 0 and proc.stdout.splitlines() == [
        "hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B",
        "hf download jackyhate/HiAR hiar.pt --local-dir ckpts"], proc.stderr
    proc = run_download_script(tmp_path / "old", ["huggingface-cli"])
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == (
        "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B"), proc.stderr
    proc = run_download_script(tmp_path / "none", [])
    assert proc.returncode == 1 and not proc.stdout
    assert "pip install -U huggingface_hub" in proc.stderr


def test_pipeline_front_in_one_process_matches_inference_and_profiles(tmp_path):
    """Without torchrun the front runs the same step-first generation; --seed is the cell-noise seed,
    --noise_seed replaces it; --profile writes this rank's timings."""
    prompt = ["--prompt", "a red circle moving left on a dark blue background", "--num_output_frames", "6"]
    assert inference.main([*TOY, *prompt, "--seed", "5", "--output_folder", str(tmp_path / "ref"),
                           "--inference_method", "timestep_first", "--save_with_index"]) == 0
    assert front.main([*TOY, *prompt, "--seed", "5", "--output_path", str(tmp_path / "a.mp4"),
                       "--profile", "--profile_output", str(tmp_path / "prof" / "p")]) == 0
    assert front.main([*TOY, *prompt, "--seed", "1", "--noise_seed", "5", "--no_dac",
                       "--output_path", str(tmp_path / "b.mp4")]) == 0
    ref = read_video(tmp_path / "ref" / "0-0.mp4")
    assert np.array_equal(read_video(tmp_path / "a.mp4"), ref)
    assert np.array_equal(read_video(tmp_path / "b.mp4"), ref)
    profile = json.loads((tmp_path / "prof" / "p_dac_rank0.json").read_text())
    assert profile["steps"] == [0, 1, 2, 3] and profile["cells"] == 8 and profile["video_frames"] == 6
    assert not list(tmp_path.glob(".*.parts"))


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--output_path", "x.avi"], "give a path ending in .mp4"),
    (["--prompt", "x", "--num_output_frames", "10"], "not a multiple of video.frames_per_block=3"),
    (["--data_path", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_pipeline_front_refuses_before_compute(tmp_path, capsys, args, message):
    assert front.main([*TOY, "--output_path", str(tmp_path / "v.mp4"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.rglob("*.mp4"))


def test_extended_prompts_generate_and_the_originals_name(tmp_path):
    prompts, extended = tmp_path / "p.txt", tmp_path / "e.txt"
    prompts.write_text("cat\n")
    extended.write_text("a red circle moving left on a dark blue background\n")
    common = [*TOY, "--num_output_frames", "3", "--save_latents"]
    assert inference.main([*common, "--data_path", str(prompts), "--extended_prompt_path", str(extended),
                           "--output_folder", str(tmp_path / "ext")]) == 0
    assert inference.main([*common, "--data_path", str(extended), "--output_folder", str(tmp_path / "long"),
                           "--save_with_index"]) == 0
    assert (tmp_path / "ext" / "cat-0.latents.safetensors").read_bytes() != b""
    from safetensors.torch import load_file
    assert load_file(tmp_path / "ext" / "cat-0.latents.safetensors")["latents"].equal(
        load_file(tmp_path / "long" / "0-0.latents.safetensors")["latents"])
    extended.write_text("one\ntwo\n")
    assert inference.main([*common, "--data_path", str(prompts), "--extended_prompt_path", str(extended),
                           "--output_folder", str(tmp_path / "bad")]) == 2
