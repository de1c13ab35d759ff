"""Run folders under faults and hostile files (hiar/runs.py): nothing a resume reads runs code, a fresh
run never wrecks an earlier one, a corrupt checkpoint falls back to the one before, a full disk leaves
the last checkpoint intact, bad settings end before compute."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import teacher

from hiar import runs
from hiar.training import Trainer

TEACHER = ["--config_path", "tiny", "train.batch_size=1", "train.log_every=1", "train.save_every=1",
           "train.sample_every=0"]


class Payload:
    """Unpickling this runs a command: what a planted checkpoint file would do to a plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(*args, program=teacher):
    """A program through its main guard: its exit code (0 when it returns)."""
    try:
        program.main_guard(lambda: program.main(list(args)))
    except SystemExit as end:
        return end.code
    return 0


@pytest.fixture
def finished(tmp_path):
    """A two-step ZeRO-2 teacher run whose checkpoints step-1 and step-2 are both kept."""
    out = tmp_path / "run"
    assert run(*TEACHER, "train.deepspeed=configs/deepspeed/zero2.json", "train.steps=2",
               f"train.output_dir={out}") == 0
    return out


@pytest.mark.parametrize("member", ["model/mp_rank_00_model_states.pt",
                                    "model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "extra.pt"])
def test_a_planted_pickle_never_runs_and_is_named(finished, tmp_path, capsys, member):
    marker = tmp_path / "pwned"
    for step in (1, 2):
        torch.save(Payload(marker), finished / "checkpoints" / f"step-0000000{step}" / member)
    code = run(*TEACHER, "train.deepspeed=configs/deepspeed/zero2.json", "train.steps=3",
               f"train.output_dir={finished}", "--resume")
    assert not marker.exists()
    assert code == 1
    err = capsys.readouterr().err
    assert f"step-00000002/{member}: refused to unpickle" in err and "none of the 2 checkpoints" in err
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == [
        "corrupt-step-00000001", "corrupt-step-00000002", "latest"]  # kept, out of the way


def test_a_corrupt_latest_falls_back_to_the_one_before_and_trains_the_same(finished, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert run(*TEACHER, "train.deepspeed=configs/deepspeed/zero2.json", "train.steps=3",
               f"train.output_dir={straight}") == 0
    states = finished / "checkpoints" / "step-00000002" / "model" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated, as by a crash of the disk under it
    partial = finished / "checkpoints" / ".step-00000003.tmp"
    partial.mkdir()
    assert run(*TEACHER, "train.deepspeed=configs/deepspeed/zero2.json", "train.steps=3",
               f"train.output_dir={finished}", "--resume") == 0
    out = capsys.readouterr()
    log = out.out + out.err
    assert "step-00000002 is unreadable" in log and "resumed from" in log and "step-00000001" in log
    assert not partial.exists()
    a, b = load_file(straight / "model.safetensors"), load_file(finished / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 1 and 2 retrained exactly
    assert (finished / "checkpoints" / "corrupt-step-00000002").is_dir()


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(finished, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    assert run(*TEACHER, "train.steps=4", f"train.output_dir={finished}") == 2
    assert "holds the checkpoints of an earlier run: continue it with --resume" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}  # nothing touched


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    saves = []
    original = Trainer.save

    def save_then_fill_the_disk(self):
        if self.step == 2:  # the second checkpoint: DeepSpeed's write fails half-way
            def full(folder, **kwargs):
                Path(folder, "model").mkdir(parents=True, exist_ok=True)
                Path(folder, "model", "half.pt").write_bytes(b"x" * 10)
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(self.engine, "save_checkpoint", full)
        saves.append(self.step)
        return original(self)

    monkeypatch.setattr(Trainer, "save", save_then_fill_the_disk)
    assert run(*TEACHER, "train.steps=3", f"train.output_dir={out}") == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and "--resume" in err
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-00000001" and (root / "step-00000001").is_dir()
    assert not list(root.glob(".*.tmp"))  # the partial temporary does not keep the disk full


def test_pruning_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step-0000000{step}").mkdir(parents=True)
    (root / "latest").write_text("step-00000001")
    runs.prune(root)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000003", "step-00000004"]
    (root / "step-00000005").mkdir()
    runs.prune(root, keep=0)  # train.keep_checkpoints=0: every checkpoint stays
    assert len(list(root.glob("step-*"))) == 4


@pytest.mark.parametrize("setting", ["train.steps=-5", "train.steps=0", "train.log_every=0", "train.batch_size=0"])
def test_impossible_settings_end_before_compute(tmp_path, capsys, setting):
    assert run(*TEACHER, setting, f"train.output_dir={tmp_path}") == 2
    assert f"{setting.split('=')[0]}=" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run folder content: nothing was built


def test_a_planted_model_pt_never_runs_on_a_distillation_resume(distill_inputs, tmp_path, capsys):
    from train import distill

    out, marker = tmp_path / "run", tmp_path / "pwned"
    args = ["--config_path", "tiny", *distill_inputs, "train.save_every=1", f"train.output_dir={out}"]
    assert run(*args, "--max_steps", "1", program=distill) == 0
    torch.save(Payload(marker), out / "checkpoints" / "step-00000001" / "model.pt")
    assert run(*args, "--max_steps", "2", "--resume", program=distill) == 1
    assert not marker.exists()
    assert "step-00000001/model.pt: refused to unpickle" in capsys.readouterr().err
    shutil.rmtree(out)


def test_broken_yaml_and_overrides_are_named(tmp_path):
    from hiar.config import ConfigError, load_config

    preset = tmp_path / "broken.yaml"
    preset.write_text("base: tiny\ntrain: [steps: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml: line 3, column 1: .*fix the file"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match=r"override .train.betas=\[0.9.: line 1"):
        load_config("tiny", ["train.betas=[0.9"])
    with pytest.raises(ConfigError, match="num_latent_frames=0 must be at least video.frames_per_block=3"):
        load_config("tiny", ["video.num_latent_frames=0"])


def test_a_checkpoint_that_is_a_fifo_is_refused(tmp_path):
    from hiar.checkpoints import CheckpointError, load_generator

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="neither a regular file nor a folder"):
        load_generator(fifo)
