"""Training programs on the tiny preset: a few steps, then resume; the resumed run equals the straight one."""

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hiar import toyteacher
from hiar.checkpoints import CheckpointError, checkpoint_config, load_generator
from hiar.config import ConfigError, load_config
from hiar.models import WanModel
from train import teacher

TINY_TEACHER = ["--config_path", "tiny", "train.batch_size=2", "train.log_every=1", "train.save_every=2",
                "train.sample_every=0", "train.warmup_steps=2"]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_teacher_resume_equals_an_uninterrupted_run(tmp_path):
    teacher.main([*TINY_TEACHER, "train.steps=4", f"train.output_dir={tmp_path / 'straight'}"])
    teacher.main([*TINY_TEACHER, "train.steps=2", f"train.output_dir={tmp_path / 'split'}"])
    teacher.main([*TINY_TEACHER, "train.steps=4", f"train.output_dir={tmp_path / 'split'}", "--resume"])
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    ckpts = tmp_path / "split" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000004"
    assert not list(ckpts.glob(".*.tmp"))  # nothing half-written left behind
    # training moved the weights
    fresh = WanModel(load_config("tiny").model).state_dict()
    assert any(not torch.equal(fresh[k], straight[k]) for k in fresh if fresh[k].shape == straight[k].shape)


def test_learning_rate_warms_up_then_decays_to_zero(tmp_path):
    """Warm-up over 2 updates, linear decay over the last 2 of 6 steps. The rate logged after step k is
    the one update k uses: 1/2 at update 0 (not logged), then full, then 1/2 at the last update (5)."""
    out = tmp_path / "run"
    teacher.main([*TINY_TEACHER, "train.steps=6", "train.decay_steps=2", f"train.output_dir={out}"])
    lr = load_config("tiny").train.lr
    logged = [json.loads(line)["lr"] / lr for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1, 1, 1, 1, 0.5, 0])


EMA = ["train.ema_decay=0.5", "train.ema_start=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Tiny teacher runs: plain1 and plain2 (1 and 2 steps), ema (2 steps with EMA); each keeps step 2's checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for steps in (1, 2):
        teacher.main([*TINY_TEACHER, f"train.steps={steps}", f"train.output_dir={root / f'plain{steps}'}"])
    teacher.main([*TINY_TEACHER, *EMA, "train.steps=2", f"train.output_dir={root / 'ema'}"])
    return root


def test_teacher_ema_is_exported_and_resumes(runs, tmp_path):
    """With train.ema_decay the exported teacher is the EMA of the weights after each update (decay
    0.5 from step 0: half the first update's weights, half the second's), and resuming restores it."""
    w1, w2, averaged = weights(runs / "plain1"), weights(runs / "plain2"), weights(runs / "ema")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    for k in w1:
        torch.testing.assert_close(averaged[k], (w1[k] + w2[k]) / 2, atol=1e-7, rtol=0)
    teacher.main([*TINY_TEACHER, *EMA, "train.steps=1", "train.save_every=1", f"train.output_dir={tmp_path / 'split'}"])
    teacher.main([*TINY_TEACHER, *EMA, "train.steps=2", f"train.output_dir={tmp_path / 'split'}", "--resume"])
    split = weights(tmp_path / "split")
    assert all(torch.equal(split[k], averaged[k]) for k in averaged)


def test_a_step_checkpoint_loads_as_the_weights_of_that_step(runs, tmp_path):
    """A one-model run's checkpoints/step-N/ (DeepSpeed weights, extra.pt, config.yaml) is a checkpoint every
    program takes: the weights at step N, or with use_ema its EMA, and the run's config. ZeRO-3's, which
    holds no whole weights, is refused naming what to load instead."""
    step = tmp_path / "step-00000002"
    shutil.copytree(runs / "ema" / "checkpoints" / step.name, step)  # this test rewrites it
    model, cfg = load_generator(step)
    assert cfg.train.ema_decay == 0.5 and checkpoint_config(step).train.ema_decay == 0.5
    plain, averaged = weights(runs / "plain2"), weights(runs / "ema")  # exported: plain2's own, ema's EMA
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    model, _ = load_generator(step, use_ema=True)
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="no EMA weights"):
        model, _ = load_generator(runs / "plain2" / "checkpoints" / "step-00000002", use_ema=True)
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="another architecture"):
        load_generator(step, load_config("tiny", ["model.num_layers=3"]))

    states = step / "model" / "mp_rank_00_model_states.pt"
    blob = torch.load(states, weights_only=False)
    blob["ds_config"]["zero_optimization"] = {"stage": 3}
    torch.save(blob, states)
    with pytest.raises(CheckpointError, match="ZeRO-3 partitioned the weights"):
        load_generator(step)


def test_teacher_writes_samples(tmp_path):
    teacher.main([*TINY_TEACHER, "train.steps=1", "train.sample_every=1", "train.sample_steps=2",
                  f"train.output_dir={tmp_path}"])
    assert len(list((tmp_path / "samples").glob("step-00000001-*.mp4"))) == 2


def test_frame_noise_draws_a_level_per_frame_for_its_share_of_samples(tmp_path, monkeypatch):
    """train.frame_noise: that share of a batch's samples gets a noise level per latent frame (diffusion
    forcing), the rest one level for all frames; out of [0, 1] it is refused before any compute."""
    from hiar.flow import FlowMatching
    from hiar.toyteacher import noise_levels

    flow = FlowMatching(3.0)
    torch.manual_seed(0)
    uniform = noise_levels(flow, 64, 5)
    assert uniform.shape == (64, 5) and torch.all(uniform == uniform[:, :1])
    mixed = noise_levels(flow, 400, 5, frame_noise=0.5)
    per_frame = (mixed != mixed[:, :1]).any(dim=1).float().mean()
    assert 0.4 < per_frame < 0.6 and 0 < mixed.min() and mixed.max() < 1
    assert (noise_levels(flow, 50, 5, frame_noise=1.0) != 0).all()
    with pytest.raises(ConfigError, match="train.frame_noise=1.5 must lie in"):
        load_config("toy", ["train.frame_noise=1.5"])
    levels, errors = [], toyteacher.flow_errors  # the option reaches the training loop: a level per frame
    monkeypatch.setattr(toyteacher, "flow_errors", lambda *a, **k: levels.append(a[4]) or errors(*a, **k))
    teacher.main([*TINY_TEACHER, "train.steps=2", "train.frame_noise=1", f"train.output_dir={tmp_path}"])
    assert len(levels) == 2 and all((s != s[:, :1]).any(dim=1).all() for s in levels)


def test_context_noise_gives_its_share_of_samples_a_nearly_clean_first_frame(tmp_path, monkeypatch):
    """train.context_noise: that share of samples has its first latent frame at a level of at most
    CONTEXT_TRAINING_LEVEL and every other frame at one level, the case in which only the caption says
    where the objects go next; without it the levels are drawn exactly as before; shares above 1 in all are refused."""
    from hiar.flow import FlowMatching
    from hiar.toyteacher import CONTEXT_TRAINING_LEVEL, noise_levels

    flow = FlowMatching(3.0)
    torch.manual_seed(0)
    sigma = noise_levels(flow, 600, 5, frame_noise=0.2, context_noise=0.5)
    rest_shared = torch.all(sigma[:, 1:] == sigma[:, 1:2], dim=1)
    context = rest_shared & (sigma[:, 0] != sigma[:, 1])
    per_frame = ~rest_shared
    assert 0.42 < context.float().mean() < 0.58 and 0.14 < per_frame.float().mean() < 0.26
    assert sigma[context, 0].max() <= CONTEXT_TRAINING_LEVEL and sigma[context, 1:].mean() > 0.5
    torch.manual_seed(1)
    before = noise_levels(flow, 64, 5, frame_noise=0.3)
    torch.manual_seed(1)
    assert torch.equal(before, noise_levels(flow, 64, 5, frame_noise=0.3, context_noise=0.0))
    with pytest.raises(ConfigError, match="train.context_noise=0.6 must lie in"):
        load_config("toy", ["train.frame_noise=0.5", "train.context_noise=0.6"])
    levels, errors = [], toyteacher.flow_errors  # the option reaches the training loop
    monkeypatch.setattr(toyteacher, "flow_errors", lambda *a, **k: levels.append(a[4]) or errors(*a, **k))
    teacher.main([*TINY_TEACHER, "train.steps=2", "train.context_noise=1", f"train.output_dir={tmp_path}"])
    assert len(levels) == 2
    assert all((s[:, 0] <= CONTEXT_TRAINING_LEVEL).all() and (s[:, 1:] == s[:, 1:2]).all() for s in levels)


def test_context_noise_min_lifts_the_other_frames_level_alone(tmp_path, monkeypatch):
    """train.context_noise_min maps the level of the other frames of a context sample into [min, 1] from
    the same draws (the first frame and which samples are context ones unchanged); 1 and above is refused."""
    from hiar.flow import FlowMatching
    from hiar.toyteacher import noise_levels

    flow = FlowMatching(3.0)
    draws = []
    for floor in (0.0, 0.7):
        torch.manual_seed(2)
        draws.append(noise_levels(flow, 400, 5, frame_noise=0.2, context_noise=0.5, context_noise_min=floor))
    plain, lifted = draws
    context = torch.all(plain[:, 1:] == plain[:, 1:2], dim=1) & (plain[:, 0] != plain[:, 1])
    assert 150 < int(context.sum()) < 250
    assert torch.allclose(lifted[context, 1:], 0.7 + 0.3 * plain[context, 1:])
    assert lifted[context, 1:].min() >= 0.7 and plain[context, 1:].min() < 0.5
    assert torch.equal(lifted[:, 0], plain[:, 0]) and torch.equal(lifted[~context], plain[~context])
    with pytest.raises(ConfigError, match="train.context_noise_min=1.0 must lie in"):
        load_config("toy", ["train.context_noise_min=1.0"])
    levels, errors = [], toyteacher.flow_errors  # the option reaches the training loop
    monkeypatch.setattr(toyteacher, "flow_errors", lambda *a, **k: levels.append(a[4]) or errors(*a, **k))
    teacher.main([*TINY_TEACHER, "train.steps=2", "train.context_noise=1", "train.context_noise_min=0.9",
                  f"train.output_dir={tmp_path}"])
    assert len(levels) == 2 and all((s[:, 1:] >= 0.9).all() for s in levels)


def test_a_teacher_trains_on_from_init_weights_and_refuses_another_architecture(tmp_path):
    """train.init_weights: the teacher starts from a saved teacher's weights (one step at a tiny rate
    stays next to them, where a run from scratch is far off); a file of another architecture stops the
    program before any step."""
    from conftest import random_model

    from hiar.checkpoints import CheckpointError, save_model

    cfg = load_config("tiny")
    torch.manual_seed(7)
    start = save_model(random_model(cfg), cfg, tmp_path / "start.safetensors")
    initial = load_file(start)
    for name, extra in (("on", [f"train.init_weights={start}"]), ("fresh", [])):
        teacher.main([*TINY_TEACHER, "train.steps=1", "train.lr=1e-7", *extra, f"train.output_dir={tmp_path / name}"])
    gap = {name: max((weights(tmp_path / name)[k] - v).abs().max().item() for k, v in initial.items())
           for name in ("on", "fresh")}
    assert gap["on"] < 1e-5 < 1e-2 < gap["fresh"]
    wide = load_config("tiny", ["model.ffn_dim=128"])
    other = save_model(random_model(wide), wide, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        teacher.main([*TINY_TEACHER, "train.steps=1", f"train.init_weights={other}",
                      f"train.output_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_non_finite_losses_abort_with_a_message(tmp_path, monkeypatch):
    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(toyteacher, "flow_matching_loss", lambda *a, **k: nan)
    with pytest.raises(SystemExit) as exit_info:
        teacher.main_guard(lambda: teacher.main([*TINY_TEACHER, "train.steps=5", "train.max_nonfinite=2",
                                                 f"train.output_dir={tmp_path}"]))
    assert exit_info.value.code == 3


def test_ode_pairs_then_ode_init(tmp_path):
    from train import ode_init
    from train import ode_pairs

    from hiar.checkpoints import save_model
    from hiar.config import load_config
    from hiar.trajectories import TrajectoryStore, read_trajectories

    from conftest import random_model

    cfg = load_config("tiny")
    teacher_path = save_model(random_model(cfg), cfg, tmp_path / "teacher.safetensors")
    pairs = ["--config_path", "tiny", f"ode.teacher={teacher_path}", f"ode.output_dir={tmp_path / 'pairs'}",
             "ode.num_trajectories=5", "ode.per_shard=2", "ode.steps=8", "ode.batch_size=2"]
    ode_pairs.main(pairs)
    shards = sorted((tmp_path / "pairs").glob("shard-*.tar"))
    assert len(shards) == 3
    # a killed run resumes: a missing shard is made again, finished ones are not touched
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    ode_pairs.main(pairs)
    assert shards[1].is_file() and shards[0].stat().st_mtime_ns == kept
    trajectories = list(read_trajectories(tmp_path / "pairs"))
    store = TrajectoryStore(tmp_path / "pairs")  # random access reads the same records
    assert len(store) == 5
    for i in (3, 0, 4, 1):
        assert store[i]["key"] == trajectories[i]["key"] and store[i]["caption"] == trajectories[i]["caption"]
        assert torch.equal(store[i]["points"], trajectories[i]["points"])
        assert torch.equal(store[i]["final"], trajectories[i]["final"])
    assert [t["key"] for t in trajectories] == [f"{i:08d}" for i in range(5)]
    t = trajectories[0]
    assert t["points"].shape == (4, 9, 16, 4, 4) and t["final"].shape == (9, 16, 4, 4)
    assert t["timesteps"][0] == 1000 and (t["timesteps"][1:] < t["timesteps"][:-1]).all()

    init = ["--config_path", "tiny", f"ode.teacher={teacher_path}", f"ode.output_dir={tmp_path / 'pairs'}",
            "train.batch_size=2", "train.save_every=1", "train.warmup_steps=1"]
    ode_init.main([*init, "train.steps=2", f"train.output_dir={tmp_path / 'straight'}"])
    ode_init.main([*init, "train.steps=1", f"train.output_dir={tmp_path / 'split'}"])
    ode_init.main([*init, "train.steps=2", f"train.output_dir={tmp_path / 'split'}", "--resume"])
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_activation_checkpointing_gives_the_same_gradients(tiny, tiny_inputs):
    """train.gradient_checkpointing recomputes block activations in backward: same loss, same gradients."""
    from conftest import random_model

    from hiar.training import enable_activation_checkpointing

    x, t, text = tiny_inputs
    grads, ffn_calls = [], []
    for checkpointed in (False, True):
        model = random_model(tiny).train()
        if checkpointed:
            enable_activation_checkpointing(model)
        calls = []
        model.blocks[0].ffn.register_forward_hook(lambda *_: calls.append(1))
        model(x, t, text).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        ffn_calls.append(len(calls))
    assert ffn_calls == [1, 2]  # checkpointed: the block runs again in backward
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights(tiny, tiny_inputs):
    """train.autocast: the wrapped forward computes in bfloat16 (its output rounded, within bfloat16's
    precision of float32's), the weights, their names and their gradients stay float32."""
    from conftest import random_model

    from hiar.config import TrainConfig
    from hiar.training import apply_cpu_speedups

    x, t, text = tiny_inputs
    model = random_model(tiny).train()
    names = [n for n, _ in model.named_parameters()]
    full = model(x, t, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on a CPU without native bfloat16 (the next test)
        apply_cpu_speedups(model, TrainConfig(autocast=True))
    mixed = model(x, t, text)
    assert full.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    assert not torch.equal(mixed.float(), full)
    torch.testing.assert_close(mixed.float(), full, rtol=0, atol=0.05 * full.abs().max().item())
    mixed.float().square().mean().backward()
    assert [n for n, _ in model.named_parameters()] == names
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("native", [True, False])
def test_autocast_warns_where_bfloat16_is_emulated(tiny, monkeypatch, native):
    """On a CPU without AVX512-BF16 the toy teacher's step took 24.5 s with train.autocast against 2.4 s
    without (docs/training.md): a run asked to autocast there is told so before it starts, and not elsewhere."""
    from conftest import random_model

    from hiar import training
    from hiar.config import TrainConfig

    monkeypatch.setattr(training, "native_cpu_bfloat16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training.apply_cpu_speedups(random_model(tiny), TrainConfig(autocast=True))
    assert [str(w.message).startswith("train.autocast on a CPU without native bfloat16") for w in caught] == (
        [] if native else [True])


def test_compiled_blocks_train_to_the_eager_gradients(tiny, tiny_inputs):
    """train.compile_blocks: gradients through the compiled blocks equal the eager ones to float rounding
    (inductor reorders float32 arithmetic)."""
    from conftest import compile_unavailable, random_model

    from hiar.config import TrainConfig
    from hiar.training import apply_cpu_speedups

    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    x, t, text = tiny_inputs
    grads = []
    for compiled in (False, True):
        model = random_model(tiny).train()
        apply_cpu_speedups(model, TrainConfig(compile_blocks=compiled))
        assert ("self_attention_input" in vars(model.blocks[0])) == compiled
        model(x, t, text).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A run killed while DeepSpeed loaded its CPU comm op left torch's build lock, and the next run hung
    at start-up; hiar.distributed.init now removes a lock older than any build."""
    from torch.utils.cpp_extension import _get_build_directory

    from hiar.distributed import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(_get_build_directory("some_op", False)) / "lock"
    lock.touch()
    assert not clear_stale_build_lock("some_op") and lock.exists()  # a build may be running
    os.utime(lock, (lock.stat().st_atime - 3600, lock.stat().st_mtime - 3600))
    assert clear_stale_build_lock("some_op") and not lock.exists()


def test_ode_pairs_on_two_ranks_with_uneven_shares(tmp_path):
    """3 shards over 2 ranks: rank 0 makes two, rank 1 one and finishes first; whichever finds every
    shard on disk writes the manifest (no barrier a slower rank could time out)."""
    import subprocess

    from conftest import random_model
    from hiar.checkpoints import save_model

    cfg = load_config("tiny")
    path = save_model(random_model(cfg), cfg, tmp_path / "teacher.safetensors")
    out = tmp_path / "pairs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train/ode_pairs.py",
           "--config_path", "tiny", f"ode.teacher={path}", f"ode.output_dir={out}", "ode.num_trajectories=3",
           "ode.per_shard=1", "ode.steps=4", "ode.batch_size=1"]
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-00000{i}.tar" for i in range(3)]
    assert manifest["trajectories"] == 3
