"""train/distill.py as it runs at scale, on the tiny preset: ZeRO-3 end to end with sample videos and a
sharded teacher on two processes, gradient accumulation, the data order, the rehearsal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="module")
def inputs(distill_inputs):
    return [*distill_inputs, "distill.ema_start=0"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_one_epoch_of_trajectories_reads_each_once_with_accumulation(inputs, tmp_path, monkeypatch):
    """4 trajectories, 2 micro-steps an update, a generator update every 2nd step: steps 0 and 2 read
    the whole set once, in a shuffled order; prompts are fresh for every update and micro-step."""
    import hiar.distill
    from hiar.order import ShuffledOrder
    from train import distill

    read, prompts = [], []
    batch = hiar.distill.trajectory_batch
    monkeypatch.setattr(hiar.distill, "trajectory_batch",
                        lambda store, indices: read.extend(indices) or batch(store, indices))
    draw = ShuffledOrder.draw

    def recording_draw(self, number, size):
        indices = draw(self, number, size)
        if self.size is None:  # the toy world's prompts
            prompts.extend(indices)
        return indices

    monkeypatch.setattr(ShuffledOrder, "draw", recording_draw)
    distill.main(["--config_path", "tiny", *inputs, "train.total_batch_size=2", "--max_steps", "4",
                  f"train.output_dir={tmp_path}", "train.save_every=0"])
    assert sorted(read) == [0, 1, 2, 3] and read != [0, 1, 2, 3]
    # 2 generator updates + 4 critic updates, 2 micro-steps each: 12 draws of fresh prompts
    assert sorted(prompts) == list(range(12))


def test_zero3_end_to_end_on_two_processes_with_samples(inputs, tmp_path):
    """ZeRO-3 generator and critic, a ZeRO-3 teacher, sample videos (every rank runs the forwards, rank 0
    writes), accumulation to a total batch of 4 over 2 ranks, checkpoint and export."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train/distill.py",
           "--config_path", "tiny", *inputs, "--max_steps", "2", f"train.output_dir={out}",
           "train.deepspeed=configs/deepspeed/zero3.json", "distill.teacher_sharding=zero3", "train.sample_every=2",
           "train.total_batch_size=4", "train.save_every=2"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = metrics(out)
    assert all(v == v for m in (first, second) for v in m.values())  # finite
    assert "generator_loss" in first and "generator_loss" not in second
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002-0.mp4", "step-00000002-1.mp4"]
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-00000002" / "model.pt").is_file()


def test_the_rehearsal_runs_the_program_on_random_weights(tmp_path, capsys):
    """No input files at all: random weights of the config's sizes, random prompts and trajectories."""
    from train import distill

    distill.main(["--config_path", "tiny", "--rehearse", "--max_steps", "3", f"train.output_dir={tmp_path}",
                  "train.save_every=0", "train.log_every=1", "distill.dfake_gen_update_ratio=2"])
    report = capsys.readouterr()
    text = report.out + report.err
    assert "generator + critic step" in text and "critic-only step" in text and "peak during the steps" in text
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    assert "fkl_loss" in metrics(tmp_path)[0]


def test_a_total_batch_that_does_not_divide_ends_with_a_message_before_any_model(tmp_path, capsys):
    from train import distill

    with pytest.raises(SystemExit) as end:
        distill.main_guard(lambda: distill.main(["--config_path", "tiny", "--rehearse", "train.batch_size=2",
                                                 "train.total_batch_size=3", f"train.output_dir={tmp_path}"]))
    assert end.value.code == 2
    assert "train.total_batch_size=3 is not a multiple of train.batch_size=2" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # nothing was built or written
