"""What careless or hostile input does to inference.py: a clear error before compute (exit 2), or files
that are whole under their final names, never shared between processes, never replaced without
--overwrite (tiny preset, CPU)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import inference
from hiar.codecs import ToyDCTCodec
from hiar.config import load_config
from hiar.data import load_prompts
from hiar.render import render
from hiar.video import Claim, VideoWriteError, VideoWriter, claim_free, read_video

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config_path", "tiny"]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def prompt_index(latents: Path) -> str:
    with safe_open(latents, "pt") as f:
        return f.metadata()["prompt_index"]


# -- 1. a write that fails is an error naming the file, and leaves only <name>.partial ----------------

DISK_FULL = """
import resource, signal, sys
import inference

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for limit, args in {runs!r}:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    print("RC", inference.main(args), file=sys.stderr, flush=True)
"""


def test_a_full_disk_fails_naming_the_file_and_keeps_only_a_partial(tmp_path):
    """30 frames make a ~12 kB mp4 and ~30 kB of latents; config.yaml is ~2 kB. Under a 6 kB file
    size limit the video fails (ffmpeg is stopped by the limit); under 20 kB the video is written and
    the latents fail."""
    common = [*TINY, "--num_output_frames", "30", "--prompt", "x"]
    runs = [(6_000, [*common, "--output_folder", str(tmp_path / "video")]),
            (20_000, [*common, "--output_folder", str(tmp_path / "latents"), "--save_latents"])]
    done = subprocess.run([sys.executable, "-c", DISK_FULL.format(root=str(ROOT), runs=runs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert [line for line in err.splitlines() if line.startswith("RC")] == ["RC 1", "RC 1"], err[-3000:]
    assert "wrote" not in done.stdout
    assert f"{tmp_path / 'video' / 'x-0.mp4'}: ffmpeg " in err  # the file is named
    assert files(tmp_path / "video") == ["config.yaml", "x-0.mp4.partial"]  # never under the final name
    assert f"{tmp_path / 'latents' / 'x-0.latents.safetensors.partial'}: File too large" in err
    assert files(tmp_path / "latents") == ["config.yaml", "x-0.latents.safetensors.partial", "x-0.mp4"]
    assert read_video(tmp_path / "latents" / "x-0.mp4").shape[0] == 30


def test_an_encoder_that_dies_is_an_error_naming_the_file(tmp_path):
    writer = VideoWriter(tmp_path / "v.mp4", fps=8, height=32, width=32)
    writer.write(torch.zeros(4, 3, 32, 32))
    writer._proc.kill()  # as the OOM killer or a file size limit would
    with pytest.raises(VideoWriteError, match=f"^{tmp_path / 'v.mp4'}: ffmpeg was killed by SIGKILL"):
        writer.close()
    assert not (tmp_path / "v.mp4").exists()


def test_a_crash_mid_video_keeps_a_playable_prefix_as_partial(tmp_path):
    cfg = load_config("tiny")

    def blocks():
        yield 0, torch.zeros(1, 3, 16, 4, 4)
        raise RuntimeError("the model died")

    with pytest.raises(RuntimeError, match="the model died"):
        render(ToyDCTCodec(), cfg, blocks(), [tmp_path / "v.mp4"], [tmp_path / "v.latents.safetensors"])
    assert files(tmp_path) == ["v.mp4.partial"]  # the unwritten latents leave nothing
    assert read_video(tmp_path / "v.mp4.partial").shape == (3, 32, 32, 3)


# -- 2. names are claimed exclusively; nothing is replaced without --overwrite ---------------------------


def test_claims_are_exclusive_and_released_claims_leave_nothing(tmp_path):
    first = claim_free(tmp_path, "x", (".mp4", ".latents.safetensors"), overwrite=False)
    second = claim_free(tmp_path, "x", (".mp4", ".latents.safetensors"), overwrite=False)
    assert [c.final.name for c in first + second] == ["x.mp4", "x.latents.safetensors",
                                                       "x (2).mp4", "x (2).latents.safetensors"]
    assert Claim.take(tmp_path / "x.mp4", overwrite=True) is None  # a live claim holds even against --overwrite
    first[0].write(b"video")
    first[1].release()
    for claim in second:
        claim.release()
    assert files(tmp_path) == ["x.mp4"]
    (tmp_path / "y.mp4.partial").write_bytes(b"a crashed run's")
    assert claim_free(tmp_path, "y", (".mp4",), overwrite=False)[0].final.name == "y (2).mp4"
    stale = Claim.take(tmp_path / "y.mp4", overwrite=True)  # --overwrite takes a stale partial over
    assert stale is not None and stale.write(b"new") == tmp_path / "y.mp4"


def test_a_second_run_into_the_folder_never_takes_the_first_runs_name(tmp_path, monkeypatch):
    """The second run starts after the first claimed its name and before its file exists (the first
    run is still generating): each run keeps its own video."""
    args = [*TINY, "--prompt", "x", "--output_folder", str(tmp_path), "--num_output_frames", "3", "--save_latents"]
    real_render, nested = inference.render, []

    def render_after_a_second_run(*a, **k):
        if not nested:  # the outer run's render (the nested run's own render comes here with `nested` set)
            nested.append(None)
            nested[0] = inference.main([*args, "--seed", "2"])
        return real_render(*a, **k)

    monkeypatch.setattr(inference, "render", render_after_a_second_run)
    assert inference.main([*args, "--seed", "1"]) == 0 and nested == [0]
    assert files(tmp_path) == ["config (2).yaml", "config.yaml", "prompts.json", "x-0 (2).latents.safetensors",
                               "x-0 (2).mp4", "x-0.latents.safetensors", "x-0.mp4"]
    with safe_open(tmp_path / "x-0.latents.safetensors", "pt") as a, \
            safe_open(tmp_path / "x-0 (2).latents.safetensors", "pt") as b:
        assert not torch.equal(a.get_tensor("latents"), b.get_tensor("latents"))  # seeds 1 and 2: both kept


def test_ranks_whose_prompts_share_a_name_keep_both_videos(tmp_path, monkeypatch):
    """Under torchrun (data parallel) rank 1 runs while rank 0 generates: the prompt listed twice gives
    both ranks the name "...left-0"."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na red circle moving left\n")
    out = tmp_path / "out"
    args = [*TINY, "--data_path", str(prompts), "--output_folder", str(out), "--num_output_frames", "3",
            "--save_latents"]
    real_render, nested = inference.render, []

    def render_while_rank_1_runs(*a, **k):
        if not nested:  # rank 0's render (rank 1's own render comes here with `nested` set)
            nested.append(None)
            monkeypatch.setenv("RANK", "1")
            nested[0] = inference.main(args)
            monkeypatch.setenv("RANK", "0")
        return real_render(*a, **k)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(inference, "render", render_while_rank_1_runs)
    assert inference.main(args) == 0 and nested == [0]
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["a red circle moving left-0 (2).mp4", "a red circle moving left-0.mp4"]
    assert sorted(prompt_index(v.with_suffix(".latents.safetensors")) for v in videos) == ["0", "1"]


def test_nothing_in_the_output_folder_is_replaced_without_overwrite(tmp_path):
    mine = {"config.yaml": b"my notes", "x-0.mp4": b"my video", "x-0 (2).latents.safetensors": b"my latents",
            ".hiar_write_test": b"my probe"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    args = [*TINY, "--prompt", "x", "--output_folder", str(tmp_path), "--num_output_frames", "3", "--save_latents"]
    assert inference.main(args) == 0
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert files(tmp_path) == sorted([*mine, "config (2).yaml", "prompts.json", "x-0 (3).mp4",
                                      "x-0 (3).latents.safetensors"])
    assert inference.main([*args, "--overwrite"]) == 0
    assert (tmp_path / "config.yaml").read_bytes() != mine["config.yaml"]
    assert read_video(tmp_path / "x-0.mp4").shape[0] == 3
    assert not list(tmp_path.glob("*.partial"))


# -- 3. careless input: one sentence naming the input and the fix, before any compute ---------------------


@pytest.fixture
def traps(tmp_path):
    """Inputs a careless user gives: a folder named like a checkpoint, FIFOs, a binary prompt file,
    a config with a YAML syntax error."""
    (tmp_path / "x.pt").mkdir()
    os.mkfifo(tmp_path / "fifo.pt")
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "nul.txt").write_bytes(b"\0" * 2**20)
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 scene\n".encode("latin-1"))
    (tmp_path / "broken.yaml").write_text("base: tiny\nvideo: {fps: 8\n")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--num_output_frames", "0"], "--num_output_frames=0 must be positive"),
    (["--data_path", "{dir}/nul.txt"], "nul.txt line 1 holds the control character '\\x00'"),
    (["--data_path", "{dir}/latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["--data_path", "{dir}/fifo.txt"], "fifo.txt is not a regular file"),
    (["--data_path", "{dir}"], "is a folder"),
    (["--prompt", "x", "--config_path", "{dir}/broken.yaml"], "error: {dir}/broken.yaml: line 3, column 1: "),
    (["--prompt", "x", "video.fps=[8"], "error: override 'video.fps=[8': line 1"),
    (["--prompt", "x", "--device", "cuda"], "--device cuda: this machine has no usable CUDA GPU"),
    (["--prompt", "x", "--device", "tpu"], "--device tpu is not a device: use cpu or cuda"),
    (["--prompt", "x", "--checkpoint_path", "{dir}/x.pt"], "x.pt is a folder named like a .pt file"),
    (["--prompt", "x", "--checkpoint_path", "{dir}/fifo.pt"], "fifo.pt is not a regular file"),
    (["--prompt", "x", "--schedule", "step_major", "--num_output_frames", "30000000"],
     "use sampling.schedule=wavefront"),
])
def test_careless_input_fails_before_compute(traps, monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(inference.Generation, "run", lambda *a: pytest.fail("compute started"))
    out = traps / "out"
    args = [a.replace("{dir}", str(traps)) for a in args]
    assert inference.main([*TINY, "--output_folder", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message.replace("{dir}", str(traps)) in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line
    assert not out.exists() or not list(out.iterdir())


def test_step_major_refuses_a_sweep_over_its_bound(monkeypatch):
    """1,000 tiny blocks hold 5.9 MiB up front; a 1 MiB bound refuses them before the first cell."""
    from hiar import sampling
    from conftest import random_model

    monkeypatch.setattr(sampling, "STEP_MAJOR_MAX_BYTES", 2**20)
    cfg = load_config("tiny", ["sampling.schedule=step_major"])
    blocks = sampling.generate(random_model(cfg), torch.zeros(1, 8, 384), cfg, sampling.block_noise(cfg, 0, [0]), 1000)
    with pytest.raises(ValueError, match=r"5.9 MiB .* \(at most 1.0 MiB\): use sampling.schedule=wavefront"):
        next(blocks)
    sampling.check_step_major("wavefront", "timestep_first", (3, 16, 4, 4), 1, 1000)  # the streaming order: fine


def test_a_prompt_that_looks_like_an_option_makes_a_normal_file(tmp_path, monkeypatch):
    """Files land in the working directory ('--output_folder .'), where ffmpeg would read a bare
    '-y-0.mp4' as an option."""
    (tmp_path / "prompts.txt").write_text("-y\n-f null\n")
    monkeypatch.chdir(tmp_path)
    assert inference.main([*TINY, "--data_path", "prompts.txt", "--output_folder", ".", "--num_output_frames", "3"]) == 0
    assert inference.main([*TINY, "--prompt=-y", "--output_folder", ".", "--num_output_frames", "3"]) == 0
    for name in ("-y-0.mp4", "-f null-0.mp4", "-y-0 (2).mp4"):
        assert read_video(tmp_path / name).shape == (3, 32, 32, 3)


def test_defaults_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = inference.parse_args([])
    cfg = inference.resolve_config(args)
    assert cfg.runtime.checkpoint and inference.read_prompts(args, cfg)


def test_unknown_prompt_file_types_never_reach_the_network(tmp_path, monkeypatch):
    hub = types.SimpleNamespace(load_dataset=lambda *a, **k: pytest.fail("datasets.load_dataset was called"))
    monkeypatch.setitem(sys.modules, "datasets", hub)
    for name in ("prompts.xyz", "prompts"):
        (tmp_path / name).write_text('{"prompt": "a"}\n')
        with pytest.raises(ValueError, match=r"unknown type .*: use one of .txt, .json, .jsonl, .csv, .parquet"):
            load_prompts(tmp_path / name)
    (tmp_path / "nul.txt").write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="control character"):
        load_prompts(tmp_path / "nul.txt")
