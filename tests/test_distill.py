"""Distillation (train/distill.py, hiar/distill.py): where the generator's gradient comes from, the
DMD and forward-KL formulas on cases with known answers, and the program end to end on the tiny preset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_model
from hiar.checkpoints import load_generator, save_model
from hiar.config import ConfigError, load_config
from hiar.distill import DMD, chord_x0, dmd_gradient, exit_step, forward_kl_loss, self_rollout
from hiar.flow import CONTEXT_LEVEL, FlowMatching
from hiar.models import Cached
from hiar.sampling import block_noise

ROOT = Path(__file__).resolve().parent.parent

def test_exit_step_is_a_function_of_seed_and_step_and_covers_its_range():
    draws = [exit_step(0, s, 1, 4) for s in range(400)]
    assert draws == [exit_step(0, s, 1, 4) for s in range(400)]  # no hidden state: every rank agrees
    assert set(draws) == {1, 2, 3}
    assert all(60 < draws.count(e) < 200 for e in (1, 2, 3))  # roughly uniform
    assert draws != [exit_step(1, s, 1, 4) for s in range(400)]


@pytest.mark.parametrize("method", ["timestep_first", "frame_first"])
def test_generator_gradient_comes_only_from_the_exit_step_forwards(method):
    """Record every forward of a rollout (9 frames, gradient window of the last 6, exit step 2), then
    rebuild the gradient from the recorded exit-step forwards alone: it must equal the rollout's. No
    cache write may run with grad, and no cached K/V may require grad."""
    cfg = load_config("tiny", [f"sampling.method={method}", "distill.num_rollout_frames=9",
                               "distill.num_training_frames=6", "sampling.fused=true",
                               # the plain window (tests/test_recipe.py covers the re-encoded one)
                               "distill.rollout_length=max", "distill.window_start=slice"])
    model = random_model(cfg)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(0))
    calls = []

    def record(module, args, out):
        x, t, _, mode = args
        calls.append({"grad": torch.is_grad_enabled(), "x": x.detach(), "t": t, "mode": mode,
                      "kv_grad": any(k.requires_grad or v.requires_grad
                                                                 for store in mode.cache._layers
                                                                 for k, v in store.values())})

    def pre(module, args):  # the cache as the forward sees it, before its own write
        calls.append({"pre": args[3].cache.copy()})

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(record)]
    x = self_rollout(model, text, cfg, block_noise(cfg, 0, [0, 1]), exit=2, grad=True)
    for h in hooks:
        h.remove()
    assert x.shape[1] == 6 and x.requires_grad
    weights = torch.randn_like(x)
    model.zero_grad()
    (x * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    forwards = [{**post, "cache": pre["pre"]} for pre, post in zip(calls[::2], calls[1::2])]
    with_grad = [f for f in forwards if f["grad"]]
    assert len(with_grad) == 2  # the exit step of the two blocks in the window, nothing else
    assert all(f["mode"].write_frames == 0 and f["mode"].start_frame >= 3 for f in with_grad)
    assert not any(f["kv_grad"] for f in forwards)

    model.zero_grad()
    flow, t_exit = FlowMatching(cfg.schedule.shift), with_grad[0]["t"]
    replay = torch.cat([flow.x0_from_flow(f["x"], model(f["x"], f["t"], text, Cached(f["cache"], f["mode"].start_frame)),
                                          f["t"]) for f in with_grad], dim=1)
    assert all(f["t"] == t_exit for f in with_grad)
    torch.testing.assert_close(replay, x.detach(), rtol=0, atol=0)
    (replay * weights).sum().backward()
    for n, p in model.named_parameters():
        # The rollout projects the prompt once for both forwards, the replay once per forward: the
        # cross-attention K/V weights sum the same terms in another order (1e-6 on near-zero entries).
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5 * float(grads[n].abs().max()))


def test_rollout_without_grad_equals_inference_at_the_last_exit_step():
    """Exit step S-1 is plain inference: the training rollout is the sampler, not a copy of it."""
    from hiar.sampling import sample_video

    cfg = load_config("tiny")
    model = random_model(cfg)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    noise = block_noise(cfg, 3, [0])
    with torch.no_grad():
        video = sample_video(model, text, cfg, noise, 3)
    torch.testing.assert_close(self_rollout(model, text, cfg, noise, exit=3, grad=False), video, rtol=0, atol=0)


def test_dmd_gradient_normalisation():
    x = torch.zeros(2, 3, 4, 2, 2)
    real = x - torch.tensor([2.0, 0.5]).reshape(2, 1, 1, 1, 1)  # mean |x - real| = 2 and 0.5
    fake = real + 1.0
    g = dmd_gradient(x, real, fake)
    torch.testing.assert_close(g[0], torch.full_like(g[0], 0.5).double())
    torch.testing.assert_close(g[1], torch.full_like(g[1], 2.0).double())


def test_dmd_pushes_nowhere_when_the_critic_is_the_teacher():
    """Real and fake score agree (critic = teacher, no guidance): g = 0, so no generator gradient."""
    cfg = load_config("tiny", ["distill.guidance_scale=1.0"])
    teacher = random_model(cfg)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim)
    dmd = DMD(teacher, torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
    x = torch.randn(2, 9, 16, 4, 4, requires_grad=True)
    loss, info = dmd.generator_loss(x, text, teacher)
    loss.backward()
    assert info["dmd_grad_norm"] < 1e-5 and x.grad.abs().max() < 1e-8
    # ... and a critic that disagrees does push
    other = random_model(cfg, seed=1)
    x.grad = None
    loss, info = dmd.generator_loss(x, text, other)
    loss.backward()
    assert info["dmd_grad_norm"] > 1e-2 and x.grad.abs().max() > 1e-6


class Recording(torch.nn.Module):
    """A stand-in score model that keeps the timesteps it was called with and predicts zero flow."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def prompt(self, text):
        return text

    def forward(self, x, t, text, attention=None):
        self.calls.append(t.clone())
        return torch.zeros_like(x)


def test_context_share_gives_the_first_frame_of_that_share_of_samples_nearly_clean():
    """distill.context_share: that share of DMD's and the critic's samples keeps its first latent frame at
    CONTEXT_LEVEL, the rest at the sample's own level; the models get those per-frame levels. At 0 no
    extra draw is made, so every level and every later draw is the run's without the option."""
    levels = {}
    for share in (0.0, 1.0, 0.5):
        cfg = load_config("tiny", [f"distill.context_share={share}"])
        dmd = DMD(Recording(), torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
        torch.manual_seed(0)
        levels[share] = dmd.levels(torch.zeros(4000, 6, 1))
        levels[share, "next"] = torch.rand(1)
    t0, t1, half = levels[0.0], levels[1.0], levels[0.5]
    torch.manual_seed(0)
    plain = dmd.timesteps(4000), torch.rand(1)  # what a run without the option draws
    assert t0.shape == (4000,)
    torch.testing.assert_close((t0, levels[0.0, "next"]), plain)
    torch.testing.assert_close(t1[:, 1:], t0[:, None].expand(-1, 5))  # the sample's level, as without the option
    given = FlowMatching.timestep(torch.tensor(CONTEXT_LEVEL, dtype=t1.dtype))
    assert (t1[:, 0] == given).all()
    share = (half[:, 0] == given).double().mean().item()
    assert 0.47 < share < 0.53 and (half[:, 1:] == t0[:, None]).all()
    # both losses hand the models those levels
    cfg = load_config("tiny", ["distill.context_share=1.0", "distill.guidance_scale=1.0"])
    teacher, critic = Recording(), Recording()
    dmd = DMD(teacher, torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
    x, text = torch.randn(2, 6, 4), torch.randn(2, cfg.model.text_len, cfg.model.text_dim)
    dmd.generator_loss(x, text, critic)
    dmd.critic_loss(critic, x, text)
    for t in teacher.calls + critic.calls:
        assert t.shape[1:] == (6,) and (t[:, 0] == given).all() and (t[:, 1:] == t[:, -1:]).all()


def test_context_share_is_checked_before_compute():
    with pytest.raises(ConfigError, match="context_share"):
        load_config("tiny", ["distill.context_share=1.5"])


def test_chord_target_is_exact_on_known_trajectories():
    flow = FlowMatching(8.0)
    x0, eps = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64), torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    t_i, t_next = torch.tensor([900.0, 700.0], dtype=torch.float64), torch.tensor([600.0, 0.0], dtype=torch.float64)
    # a straight flow path: every chord meets sigma = 0 at its x0
    on_path = lambda t: flow.add_noise(x0, eps, t)  # noqa: E731
    torch.testing.assert_close(chord_x0(on_path(t_i), on_path(t_next), t_i, t_next), x0)
    # two consecutive Euler points of any ODE: the chord is the teacher's x0 prediction at the first
    x_i, pred = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t_after = torch.tensor([500.0, 300.0], dtype=torch.float64)
    x_next = flow.ode_step(x_i.double(), pred.double(), t_i, t_after)
    torch.testing.assert_close(chord_x0(x_i, x_next, t_i, t_after), pred.double())


def test_forward_kl_regresses_the_chord(tiny):
    """The loss is the mean squared distance to the chord target: 0 for a model that predicts it."""
    model = random_model(tiny)
    points, ts = torch.randn(2, 4, 9, 16, 4, 4), torch.tensor([[1000.0, 900, 700, 400]] * 2)
    batch = {"points": points, "timesteps": ts, "final": torch.randn(2, 9, 16, 4, 4)}
    text = torch.randn(2, tiny.model.text_len, tiny.model.text_dim)
    flow = FlowMatching(tiny.schedule.shift)
    with torch.no_grad():
        pred = flow.x0_from_flow(points[:, 0], model(points[:, 0], ts[:, 0], text), ts[:, 0])
    target = chord_x0(points[:, 0], points[:, 1], ts[:, 0], ts[:, 1])
    expected = (pred.double() - target).square().mean()
    torch.testing.assert_close(forward_kl_loss(model, batch, text, tiny).detach(), expected)


# -- the program --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(distill_inputs):
    return [*distill_inputs, "train.save_every=2", "distill.ema_start=1", "distill.ema_decay=0.5"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_distill_trains_checkpoints_and_resumes_exactly(inputs, tmp_path):
    from train import distill

    args = ["--config_path", "tiny", *inputs]
    distill.main([*args, "--max_steps", "3", f"train.output_dir={tmp_path / 'straight'}"])
    distill.main([*args, "--max_steps", "2", f"train.output_dir={tmp_path / 'split'}"])
    distill.main([*args, "--max_steps", "3", f"train.output_dir={tmp_path / 'split'}", "--resume"])
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [m["step"] for m in straight] == [1, 2, 3]
    assert split[-1] == straight[-1]  # the resumed step reproduces the uninterrupted one, every metric
    first = straight[0]  # step 0 updates generator and critic; every loss finite
    assert all(k in first for k in ("generator_loss", "dmd_loss", "fkl_loss", "critic_loss", "dmd_grad_norm"))
    assert all(v == v and abs(v) != float("inf") for m in straight for v in m.values())
    assert "generator_loss" not in straight[1]  # ratio 2: step 1 updates the critic only

    # the final export is the EMA generator; checkpoints are loadable by inference (generator / EMA)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(inputs[0].split("=", 1)[1])  # distill.generator
    assert any(not torch.equal(a[k], start[k]) for k in a)
    ckpt = tmp_path / "split" / "checkpoints" / "step-00000003" / "model.pt"
    blob = torch.load(ckpt, weights_only=True)
    assert {"generator", "generator_ema", "critic", "step", "config"} <= blob.keys() and blob["step"] == 3
    ema, cfg = load_generator(ckpt, use_ema=True)
    assert torch.equal(ema.state_dict()["proj_out.weight"], blob["generator_ema"]["proj_out.weight"])
    assert all(torch.equal(a[k], blob["generator_ema"][k].to(a[k].dtype)) for k in a)  # the export is the EMA
    folder, _ = load_generator(ckpt.parent, use_ema=True)  # the step's folder names the same checkpoint
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in folder.state_dict().items())
    # model.pt holds the checkpoint's only EMA, and the resumed run above read it back (a == b)
    assert "ema" not in torch.load(ckpt.parent / "extra.pt", weights_only=True)


def test_distill_under_torchrun_on_two_processes(inputs, tmp_path):
    """Two ranks: one generator + critic iteration with the same exit step, finite losses."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train/distill.py",
           "--config_path", "tiny", *inputs, "--max_steps", "1", f"train.output_dir={out}"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (m,) = metrics(out)
    assert m["generator_loss"] == m["generator_loss"] and m["critic_loss"] == m["critic_loss"]
    assert (out / "model.safetensors").is_file()


def test_distill_refuses_missing_inputs_before_compute(tmp_path):
    from train import distill

    with pytest.raises(SystemExit, match="distill.generator=.*nothing.safetensors"):
        distill.main(["--config_path", "tiny", f"distill.generator={tmp_path / 'nothing.safetensors'}",
                      f"train.output_dir={tmp_path}"])


def test_distill_with_a_teacher_of_another_size(inputs, tmp_path):
    """Full scale distils from a larger teacher (Wan2.1-14B, distill.teacher_model=wan14b): here a
    3-layer tiny teacher for a 2-layer student."""
    from train import distill

    preset = tmp_path / "big.yaml"
    preset.write_text("base: tiny\nmodel:\n  num_layers: 3\n")
    big = load_config(str(preset))
    teacher = save_model(random_model(big), big, tmp_path / "big.safetensors")
    distill.main(["--config_path", "tiny", *inputs, f"distill.teacher={teacher}", f"distill.teacher_model={preset}",
                  "--max_steps", "1", f"train.output_dir={tmp_path / 'run'}"])
    (m,) = metrics(tmp_path / "run")
    assert m["dmd_loss"] > 0
