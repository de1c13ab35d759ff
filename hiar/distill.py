"""Data-free distillation (DESIGN.md section 2): DMD on the student's own rollouts, in the order it
will be sampled in, plus the forward-KL regulariser on teacher ODE trajectories.

* `self_rollout`: the generator's sample. One exit step e (`exit_step`, the same on every rank) is
  run for every block; the cells of steps before e run without grad, the exit step's cells in the
  gradient window with grad, and every cache write without grad (`CellRunner`), so the generator's
  gradient comes only from the exit step's x0 predictions.
* `DMD`: reverse-KL gradient g = (x0_fake - x0_real) / mean|x - x0_real| at a shifted-uniform noise
  level, applied as the loss 0.5 ||x - stopgrad(x - g)||^2; the critic learns the generator's samples
  by flow matching.
* `forward_kl_loss`: the student regresses the teacher's chord x0 between consecutive stored
  trajectory points on its first K steps, which keeps the motion DMD alone loses.
"""

from __future__ import annotations

import torch

from hiar.config import Config
from hiar.flow import FlowMatching
from hiar.models import AttentionMode, BlockCausal, BlockCausalWindow, Bidirectional, WanModel
from hiar.sampling import CellNoise, CellRunner, guided, run_order, stable_hash


def exit_step(seed: int, step: int, low: int, num_steps: int) -> int:
    """The exit step of training step `step`: uniform in [low, num_steps - 1], a pure function of
    (seed, step), hence identical on every rank without communication."""
    return low + stable_hash("exit", seed, step) % (num_steps - low)


def self_rollout(generator: WanModel, text: torch.Tensor, cfg: Config, noise: CellNoise, exit: int,
                 grad: bool) -> torch.Tensor:
    """The generator's sample [B, num_training_frames, C, h, w]: the x0 predictions of step `exit` for
    the last `distill.num_training_frames` frames of a `distill.num_rollout_frames` rollout in the
    configured order. With `grad`, the exit step's cells of those frames carry autograd; nothing
    else does."""
    k, d = cfg.video.frames_per_block, cfg.distill
    num_blocks = d.num_rollout_frames // k
    first = num_blocks - d.num_training_frames // k  # the gradient window's first block
    cells = (lambda n, j: j == exit and n >= first) if grad else None
    with torch.set_grad_enabled(grad):
        runner = CellRunner(generator, text, cfg, noise, exit_step=exit, grad_cells=cells)
        blocks = dict(run_order(runner, num_blocks))
    return torch.cat([blocks[n] for n in range(first, num_blocks)], dim=1)


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake - x0_real) / mean|x - x0_real| per sample (DMD's normalised reverse-KL gradient)."""
    x, real_x0, fake_x0 = (v.detach().double() for v in (x, real_x0, fake_x0))
    normaliser = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


class DMD:
    """Distribution matching against a frozen teacher (the real score, with CFG) and a trained
    critic (the fake score, conditional only)."""

    def __init__(self, teacher: WanModel, negative: torch.Tensor, cfg: Config):
        d = cfg.distill
        self.teacher, self.negative, self.scale = teacher, negative, d.guidance_scale
        self.flow = FlowMatching(d.timestep_shift)
        self.t_min, self.t_max = d.t_min, d.t_max

    def timesteps(self, batch: int) -> torch.Tensor:
        """One noise level a sample: sigma = shift(u), u ~ U(t_min, t_max), clamped to [t_min, t_max]."""
        u = self.t_min + (self.t_max - self.t_min) * torch.rand(batch, dtype=torch.float64)
        return self.flow.timestep(self.flow.shifted(u).clamp(self.t_min, self.t_max))

    def generator_loss(self, x: torch.Tensor, text: torch.Tensor,
                       critic: WanModel) -> tuple[torch.Tensor, dict[str, float]]:
        """0.5 ||x - stopgrad(x - g)||^2 (mean over elements): its gradient in x is g / numel."""
        with torch.no_grad():
            t = self.timesteps(x.shape[0])
            xt = self.flow.add_noise(x, torch.randn_like(x), t)
            real_x0 = self.flow.x0_from_flow(xt, guided(self.teacher, text, self.negative, self.scale)(xt, t), t)
            fake_x0 = self.flow.x0_from_flow(xt, critic(xt, t, text), t)
            g = dmd_gradient(x, real_x0, fake_x0)
        loss = 0.5 * (x.double() - (x.double() - g).detach()).square().mean()
        return loss, {"dmd_grad_norm": g.norm().item() / g.numel() ** 0.5, "dmd_t": t.mean().item()}

    def critic_loss(self, critic: WanModel, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Flow matching on the generator's (detached) samples: the critic tracks their distribution."""
        x = x.detach()
        t = self.timesteps(x.shape[0])
        noise = torch.randn_like(x)
        pred = critic(self.flow.add_noise(x, noise, t), t, text)
        return (pred.float() - self.flow.flow_target(x, noise).float()).square().mean()


def chord_x0(x_i: torch.Tensor, x_next: torch.Tensor, t_i: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The x0 at which the chord through two trajectory points (sigma_i, x_i), (sigma_next, x_next)
    meets sigma = 0: x_i - sigma_i (x_next - x_i) / (sigma_next - sigma_i), in float64.
    t_i, t_next: [B] timesteps; exact on any straight path x(sigma) = (1 - sigma) x0 + sigma eps."""
    s_i, s_next = (FlowMatching.sigma(t.double()).reshape(-1, *[1] * (x_i.ndim - 1)) for t in (t_i, t_next))
    a, b = x_i.double(), x_next.double()
    return a - s_i * (b - a) / (s_next - s_i)


def forward_kl_attention(cfg: Config) -> AttentionMode:
    """Bidirectional as in the paper (default), or block-causal as the released code runs it."""
    if cfg.distill.fkl_attention == "bidirectional":
        return Bidirectional()
    return BlockCausal(BlockCausalWindow.from_config(cfg.video))


def forward_kl_loss(generator: WanModel, batch: dict, text: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Mean over the first `distill.fkl_steps` stored points j of ||x0_student(x_j) - chord_x0(x_j, x_{j+1})||^2.

    `batch`: points [B, K, F, ...] (the teacher's trajectory at the student's steps), timesteps [B, K],
    final [B, F, ...] (the point after the last one, at t = 0), from `hiar.ode.trajectory_batch`.
    """
    points, ts, final = batch["points"], batch["timesteps"], batch["final"]
    num_points = points.shape[1]
    attention, flow = forward_kl_attention(cfg), FlowMatching(cfg.schedule.shift)
    losses = []
    for j in range(min(cfg.distill.fkl_steps, num_points)):
        x_j, t_j = points[:, j], ts[:, j]
        x_next, t_next = (points[:, j + 1], ts[:, j + 1]) if j + 1 < num_points else (final, torch.zeros_like(t_j))
        target = chord_x0(x_j, x_next, t_j, t_next)
        x0 = flow.x0_from_flow(x_j, generator(x_j, t_j, text, attention), t_j)
        losses.append((x0.double() - target).square().mean())
    return torch.stack(losses).mean()
