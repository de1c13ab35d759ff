"""The defaults train what the released HiAR checkpoint trained (github.com/Jacky-hate/HiAR): real-score
guidance, the DMD noise-level draw, the forward-KL targets and their storage, rollouts longer than the
window, the generator's starting point and where launch/download_weights.sh puts it."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import random_model
from hiar.checkpoints import save_model
from hiar.codecs import ToyDCTCodec
from hiar.config import ConfigError, DistillConfig, ODEConfig, kept_indices, load_config
from hiar.distill import DMD, chord_x0, forward_kl_loss, rollout_blocks, self_rollout, window_loss_start
from hiar.flow import FlowMatching
from hiar.models import Bidirectional
from hiar.trajectories import read_trajectories
from hiar.sampling import block_noise, guided, teacher_ode
from hiar.text import build_text_encoder

ROOT = Path(__file__).resolve().parent.parent

# -- 1. real-score guidance ---------------------------------------------------------------------------


def test_real_score_is_cond_plus_three_times_cond_minus_uncond():
    """The reference's real score is x0_cond + 3.0 (x0_cond - x0_uncond): scale 4 in our form."""
    assert DistillConfig().guidance_scale == 4.0 and load_config("hiar").distill.guidance_scale == 4.0
    cfg = load_config("tiny")
    teacher = random_model(cfg)
    g = torch.Generator().manual_seed(0)
    text, negative = (torch.randn(n, cfg.model.text_len, cfg.model.text_dim, generator=g) for n in (2, 1))
    xt, t = torch.randn(2, 9, 16, 4, 4, generator=g), torch.tensor([300.0, 870.0])
    flow = FlowMatching(cfg.distill.timestep_shift)
    with torch.no_grad():
        cond = flow.x0_from_flow(xt, teacher(xt, t, text), t)
        uncond = flow.x0_from_flow(xt, teacher(xt, t, negative.expand_as(text)), t)
        real = DMD(teacher, negative, cfg).real_x0(xt, t, text)
    torch.testing.assert_close(real, cond + 3 * (cond - uncond), rtol=1e-5, atol=1e-5)


# -- 2. the DMD / critic noise level --------------------------------------------------------------------


def reference_support(shift: float) -> torch.Tensor:
    """Every timestep the reference can draw: 1000 shift(k / 1000) for k = 0 ... 999, clamped to [20, 980]."""
    u = torch.arange(1000, dtype=torch.float64) / 1000
    return (1000 * shift * u / (1 + (shift - 1) * u)).clamp(20, 980)


def test_dmd_timesteps_follow_the_reference_draw():
    cfg = load_config("tiny")
    assert cfg.distill.timestep_draw == "clamp_after_shift"
    dmd = DMD(random_model(cfg), torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
    torch.manual_seed(0)
    t = dmd.timesteps(200_000)
    assert 20 - 1e-9 <= t.min() < 92.6 and t.max() <= 980 + 1e-9  # the old draw never went below 92.6
    support = reference_support(cfg.distill.timestep_shift)
    drawn = t.unique()
    assert (drawn[:, None] - support[None]).abs().min(dim=1).values.max() < 1e-9  # u = k / 1000, not continuous
    for x in (20.5, 50.0, 200.0, 500.0, 800.0, 950.0, 979.9):  # its CDF, within 4 standard errors
        want = float((support <= x).double().mean())
        assert abs(float((t <= x).double().mean()) - want) < 4 * (want * (1 - want) / len(t)) ** 0.5, x
    at = lambda level: float(((t - level).abs() < 1e-9).double().mean())  # noqa: E731
    assert abs(at(20) - 0.005) < 0.001 and abs(at(980) - 0.092) < 0.003  # k <= 4 and k >= 908 clamp


def test_range_before_shift_is_the_old_draw():
    cfg = load_config("tiny", ["distill.timestep_draw=range_before_shift"])
    dmd = DMD(random_model(cfg), torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
    torch.manual_seed(0)
    t = dmd.timesteps(20_000)
    assert t.min() >= 1000 * 5 * 0.02 / (1 + 4 * 0.02) - 1e-9 and t.max() <= 980 + 1e-9
    assert t.unique().numel() > 1000  # continuous: more levels than the reference's lattice holds


# -- 3. forward-KL targets, 4. their storage, 7. ode_pairs on its device ------------------------------


def test_trajectories_keep_the_reference_points():
    assert ODEConfig().keep == "uniform" and ODEConfig().storage_dtype == "float32"
    for preset in ("hiar", "ode_pairs"):
        cfg = load_config(preset)
        assert kept_indices(cfg) == [0, 12, 24, 36] and cfg.ode.storage_dtype == "float32"
    assert kept_indices(load_config("ode_pairs", ["ode.keep=aligned"])) == [0, 17, 30, 40]  # the old points
    assert kept_indices(load_config("tiny", ["ode.keep_indices=[0, 10, 20, 30]"])) == [0, 10, 20, 30]
    with pytest.raises(ConfigError, match=r"ode.steps=50 is not a multiple of 4; use 48 or 52"):
        load_config("tiny", ["ode.steps=50"])
    with pytest.raises(ConfigError, match=r"ode.keep_indices=\[0, 12, 60, 70\] .* 4 increasing points in \[0, 48\)"):
        load_config("tiny", ["ode.keep_indices=[0, 12, 60, 70]"])


def test_ode_pairs_store_the_kept_points_exactly(tmp_path):
    """Points at ode.keep's grid indices with their exact timesteps, in float32 bit for bit (noise drawn
    on the CPU per trajectory); the manifest records them."""
    from train import ode_pairs

    cfg = load_config("tiny", ["ode.steps=8"])
    teacher = random_model(cfg)
    path = save_model(teacher, cfg, tmp_path / "teacher.safetensors")
    ode_pairs.main(["--config_path", "tiny", f"ode.teacher={path}", f"ode.output_dir={tmp_path / 'pairs'}",
                    "ode.num_trajectories=2", "ode.per_shard=2", "ode.steps=8", "ode.batch_size=2"])
    flow = FlowMatching(cfg.ode.shift)
    grid = flow.sampling_timesteps(8)
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["keep"] == [0, 2, 4, 6] and manifest["keep_timesteps"] == [grid[i].item() for i in (0, 2, 4, 6)]

    encoder = build_text_encoder(cfg)
    trajectories = list(read_trajectories(tmp_path / "pairs"))
    noise = torch.stack([ode_pairs.trajectory_noise(cfg, i) for i in range(2)])
    denoiser = guided(teacher, encoder([t["caption"] for t in trajectories]), encoder([cfg.train.negative_prompt]),
                      cfg.ode.guidance_scale)
    final, points = teacher_ode(denoiser, grid, noise, flow, [0, 2, 4, 6])
    for b, t in enumerate(trajectories):
        assert t["timesteps"].tolist() == pytest.approx([grid[i].item() for i in (0, 2, 4, 6)], rel=1e-7)
        assert torch.equal(t["points"], torch.stack([points[i][b] for i in (0, 2, 4, 6)]))
        assert torch.equal(t["final"], final[b])


def test_forward_kl_tells_the_student_its_own_step():
    """With the reference's points the stored levels (1000, 960, 888.9, 727.3) are not the student's
    (1000, 937.5, 833.3, 625): the chord uses the stored ones, the student is told its own."""
    cfg = load_config("tiny", ["distill.fkl_steps=2"])
    model = random_model(cfg)
    g = torch.Generator().manual_seed(3)
    stored = FlowMatching(8.0).sampling_timesteps(48)[[0, 12, 24, 36]].float()
    points, final = torch.randn(2, 4, 9, 16, 4, 4, generator=g), torch.randn(2, 9, 16, 4, 4, generator=g)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim, generator=g)
    batch = {"points": points, "timesteps": stored.expand(2, 4), "final": final}
    flow = FlowMatching(cfg.schedule.shift)

    def by_hand(told: list[float]) -> torch.Tensor:
        losses = []
        for j in range(2):
            t_in, t_j = torch.full((2,), told[j]), stored[j].expand(2)
            target = chord_x0(points[:, j], points[:, j + 1], t_j, stored[j + 1].expand(2))
            x0 = flow.x0_from_flow(points[:, j], model(points[:, j], t_in, text, Bidirectional()), t_in)
            losses.append((x0.double() - target).square().mean())
        return torch.stack(losses).mean()

    with torch.no_grad():
        student = forward_kl_loss(model, batch, text, cfg)
        old = forward_kl_loss(model, batch, text, load_config("tiny", ["distill.fkl_steps=2",
                                                                       "distill.fkl_timestep=stored"]))
        torch.testing.assert_close(student, by_hand([1000.0, 937.5]))
        torch.testing.assert_close(old, by_hand(stored[:2].tolist()))
    assert abs(student - old) > 1e-4


# -- 5. rollouts longer than the window -------------------------------------------------------------------


LONG = ["video.window_frames=9", "distill.num_rollout_frames=15"]  # a 9-frame window of 9..15-frame rollouts


def test_rollout_length_is_drawn_per_rollout_from_its_seed():
    cfg = load_config("tiny", LONG)
    assert (cfg.distill.rollout_length, cfg.distill.window_start) == ("uniform", "reencode")
    draws = [rollout_blocks(key, cfg) for key in range(600)]
    assert draws == [rollout_blocks(key, cfg) for key in range(600)]  # no hidden state: every rank agrees
    assert all(150 < draws.count(n) < 250 for n in (3, 4, 5)) and set(draws) == {3, 4, 5}
    assert {rollout_blocks(key, load_config("tiny", [*LONG, "distill.rollout_length=max"])) for key in range(50)} == {5}
    assert [window_loss_start(cfg, n) for n in (3, 4, 5)] == [0, 3, 3]
    assert window_loss_start(load_config("tiny", [*LONG, "distill.window_start=slice"]), 5) == 0


class CausalCodec:
    """A stand-in codec whose frame i decodes from latent frames 0..i (their sum); encode is the identity."""

    def decode(self, latents):
        return latents.cumsum(dim=1)

    def encode(self, video):
        return video


def grad_forwards(model, fn):
    """fn()'s result and how many of its model forwards ran with grad."""
    flags = []
    hook = model.register_forward_hook(lambda *_: flags.append(torch.is_grad_enabled()))
    try:
        out = fn()
    finally:
        hook.remove()
    return out, sum(flags)


@pytest.mark.parametrize("method", ["timestep_first", "frame_first"])
def test_long_rollout_reencodes_the_window_start_and_masks_its_first_block(method):
    cfg = load_config("tiny", [*LONG, f"sampling.method={method}"])
    model = random_model(cfg)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(0))
    noise = block_noise(cfg, 11, [0, 1])
    whole = load_config("tiny", [*LONG, f"sampling.method={method}", "distill.num_training_frames=15"])
    with torch.no_grad():
        video = self_rollout(model, text, whole, noise, exit=2, grad=False, num_blocks=5)  # all 15 frames
    codec = ToyDCTCodec()

    x, with_grad = grad_forwards(model, lambda: self_rollout(model, text, cfg, noise, exit=2, grad=True, num_blocks=5))
    assert x.shape[1] == 9 and with_grad == 2  # the exit step of blocks 3 and 4; block 2 is out of the loss
    torch.testing.assert_close(x[:, 1:], video[:, 7:], rtol=0, atol=0)
    torch.testing.assert_close(x[:, :1], codec.encode(codec.decode(video[:, :7])[:, -1:]), rtol=0, atol=0)
    assert not torch.allclose(x[:, :1], video[:, 6:7], atol=1e-3)  # the clamp to [-1, 1] pixels shows
    grads = torch.autograd.grad((x[:, :3] * 1.7).sum(), list(model.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    # The Wan VAE's decoder is causal: the boundary frame's pixels depend on every frame before it.
    with torch.no_grad():
        x = self_rollout(model, text, cfg, noise, exit=2, grad=False, num_blocks=5, codec=CausalCodec())
    torch.testing.assert_close(x[:, :1], video[:, :7].sum(dim=1, keepdim=True))

    # a rollout as long as the window is the plain one, every block in the loss
    y, with_grad = grad_forwards(model, lambda: self_rollout(model, text, cfg, noise, exit=2, grad=True, num_blocks=3))
    assert with_grad == 3
    torch.testing.assert_close(y.detach(), video[:, :9], rtol=0, atol=0)  # causal: the 5-block rollout's start
    # the old behaviour: the plain last frames, every window block with grad
    old = load_config("tiny", [*LONG, f"sampling.method={method}", "distill.window_start=slice"])
    z, with_grad = grad_forwards(model, lambda: self_rollout(model, text, old, noise, exit=2, grad=True, num_blocks=5))
    assert with_grad == 3
    torch.testing.assert_close(z.detach(), video[:, 6:], rtol=0, atol=0)


def test_rollout_length_defaults_to_the_draw_of_its_noise_seed():
    cfg = load_config("tiny", LONG)
    model = random_model(cfg)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    for blocks in (3, 5):  # a seed that draws the window's length and one that draws the longest
        seed = next(s for s in range(100) if rollout_blocks(s, cfg) == blocks)
        noise = block_noise(cfg, seed, [0])
        with torch.no_grad():
            drawn = self_rollout(model, text, cfg, noise, exit=1, grad=False)
            for n in (3, 4, 5):
                same = torch.equal(drawn, self_rollout(model, text, cfg, noise, exit=1, grad=False, num_blocks=n))
                assert same == (n == blocks), (blocks, n)


def test_dmd_loss_leaves_out_the_masked_frames():
    """loss_from=k: the reference's gradient_mask. The masked frames get no gradient, the others
    g / (their numel), with g (and its normaliser) computed on the whole window."""
    cfg = load_config("tiny")
    teacher, critic = random_model(cfg), random_model(cfg, seed=1)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim)
    dmd = DMD(teacher, torch.zeros(1, cfg.model.text_len, cfg.model.text_dim), cfg)
    grads = []
    for loss_from in (0, 3):
        x = torch.randn(2, 9, 16, 4, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(5)  # the same noise level and noise: the same g
        loss, _ = dmd.generator_loss(x, text, critic, loss_from=loss_from)
        loss.backward()
        grads.append(x.grad)
    full, masked = grads
    assert not masked[:, :3].any() and full[:, :3].abs().max() > 0
    torch.testing.assert_close(masked[:, 3:], full[:, 3:] * 9 / 6, rtol=1e-6, atol=0)


# -- 6. the starting point and the downloads ------------------------------------------------------------


def downloads() -> dict[str, str]:
    """{path on disk: 'repo file'} of each `hf download REPO [FILE] --local-dir DIR` in the script."""
    script = (ROOT / "launch" / "download_weights.sh").read_text()
    assert not re.search(r"^\s*(huggingface-cli|wget|curl) ", script, re.M)  # only the current CLI
    found = {}
    for repo, file, folder in re.findall(r"^\s*hf download (\S+) ?(\S*?) ?--local-dir (\S+)$", script, re.M):
        found[f"{folder}/{file}" if file else folder] = f"{repo} {file}".strip()
    return found


def test_generator_starts_from_self_forcing_ode_init_that_the_script_downloads():
    cfg = load_config("hiar")
    got = downloads()
    assert got[cfg.distill.generator] == "gdhe17/Self-Forcing checkpoints/ode_init.pt"
    assert cfg.distill.generator == "ckpts/self_forcing/checkpoints/ode_init.pt"
    assert got[cfg.distill.prompts] == "gdhe17/Self-Forcing vidprom_filtered_extended.txt"
    assert got[load_config("ode_pairs").ode.prompts] == got[cfg.distill.prompts]
    assert got[cfg.distill.teacher] == "Wan-AI/Wan2.1-T2V-14B"
    for path in (cfg.distill.critic, cfg.runtime.base_model, load_config("ode_pairs").ode.teacher):
        assert got[path] == "Wan-AI/Wan2.1-T2V-1.3B"
    assert got["ckpts/hiar.pt"] == "jackyhate/HiAR hiar.pt"


def test_the_teacher_ode_continues_given_frames():
    """teacher_ode with context: the denoiser sees the given frames exactly, at their own timestep, at every
    step, and the other frames at the ODE's; without context it is the plain ODE of all frames."""
    flow = FlowMatching(8.0)
    grid = flow.sampling_timesteps(6)
    g = torch.Generator().manual_seed(0)
    noise, given = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 1, 3, 2, 2, generator=g)
    seen = []

    def denoiser(x, t):
        seen.append((x.clone(), t))
        return 0.5 * x  # any flow: the test checks what the denoiser is given

    final, _ = teacher_ode(denoiser, grid, noise, flow, context=(given, 50.0))
    assert len(seen) == 6 and final.shape == noise.shape
    for (x, t), level in zip(seen, grid[:-1].tolist()):
        assert torch.equal(x[:, :1], given) and t.shape == (2, 4)
        assert (t[:, 0] == 50.0).all() and torch.allclose(t[:, 1:], torch.tensor(level))
    assert torch.equal(seen[0][0][:, 1:], noise[:, 1:])
    seen.clear()
    plain, _ = teacher_ode(denoiser, grid, noise, flow)
    assert torch.equal(seen[0][0], noise) and not torch.is_tensor(seen[0][1])
    # a frame-wise denoiser: the other frames are the plain ODE's, per-frame timesteps or not
    assert torch.allclose(plain[:, 1:], final[:, 1:], atol=1e-6)
