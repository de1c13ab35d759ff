"""Data-free distillation (docs/design.md, section 2): DMD on the student's own rollouts, in the order it
will be sampled in, plus the forward-KL regulariser on teacher ODE trajectories.

* `self_rollout`: the generator's sample. One exit step e (`exit_step`, the same on every rank) is
  run for every block; the cells of steps before e run without grad, the exit step's cells in the
  gradient window with grad, and every cache write without grad (`CellRunner`), so the generator's
  gradient comes only from the exit step's x0 predictions. A rollout may be longer than the window
  (distill.num_rollout_frames): by default it then runs as the reference's does, with a length drawn
  per rollout (`rollout_blocks`) and the window's first frame re-encoded as an image, its first block
  out of the loss (`window_loss_start`).
* `DMD`: reverse-KL gradient g = (x0_fake - x0_real) / mean|x - x0_real| at a shifted-uniform noise
  level (with distill.context_share, some samples keep their first frame nearly clean), applied as the
  loss 0.5 ||x - stopgrad(x - g)||^2; the critic learns the generator's samples by flow matching.
* `forward_kl_loss`: the student regresses the teacher's chord x0 between consecutive stored
  trajectory points on its first K steps, which keeps the motion DMD alone loses.
* `Distillation`: one training iteration of train/distill.py as named steps: the update's prompts, the
  generator update (DMD + forward-KL), the critic update, sample videos and the final export.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from hiar.codecs import Codec, build_codec
from hiar.config import Config
from hiar.data import PromptSource
from hiar.flow import CONTEXT_LEVEL, NUM_TRAIN_TIMESTEPS, FlowMatching
from hiar.models import AttentionMode, BlockCausal, BlockCausalWindow, Bidirectional, WanModel
from hiar.order import ShuffledOrder, updates_before
from hiar.render import render
from hiar.sampling import CellNoise, CellRunner, block_noise, generate, guided, run_order, stable_hash
from hiar.text import PromptBank
from hiar.training import EMA, Trainer
from hiar.trajectories import trajectory_batch


def exit_step(seed: int, step: int, low: int, num_steps: int) -> int:
    """The exit step of training step `step`: uniform in [low, num_steps - 1], a pure function of
    (seed, step), hence identical on every rank without communication."""
    return low + stable_hash("exit", seed, step) % (num_steps - low)


def rollout_blocks(key: int, cfg: Config) -> int:
    """How many blocks one self-rollout runs. distill.rollout_length=uniform: uniform over
    [num_training_frames, num_rollout_frames] / k, as the reference draws it for every rollout
    (model/base.py _run_generator: torch.randint on rank 0, broadcast). Here it is a pure function of
    `key`, the rollout's noise seed, which train/distill.py derives from (train.seed, role, step), so
    every rank draws the same length without communication. "max": always num_rollout_frames / k."""
    d, k = cfg.distill, cfg.video.frames_per_block
    low, high = d.num_training_frames // k, d.num_rollout_frames // k
    if d.rollout_length == "max":
        return high
    return low + stable_hash("rollout", key) % (high - low + 1)


def window_loss_start(cfg: Config, num_blocks: int) -> int:
    """The first frame of the gradient window that the DMD loss covers after a `num_blocks` rollout:
    k when the window's first block holds a re-encoded frame (a rollout longer than the window with
    distill.window_start=reencode; the reference's gradient_mask), else 0."""
    k = cfg.video.frames_per_block
    longer = num_blocks > cfg.distill.num_training_frames // k
    return k if longer and cfg.distill.window_start == "reencode" else 0


@torch.no_grad()
def reencoded_frame(latents: torch.Tensor, codec: Codec) -> torch.Tensor:
    """The last pixel frame that `latents` [B, F, C, h, w] decode to, encoded on its own as an image:
    [B, 1, C, h, w]. A window cut from a long rollout starts mid-video, where the Wan VAE's latent
    frames stand for 4 pixel frames each; a video's first latent frame stands for one. The teacher
    only ever saw windows that start as videos do, so the reference re-encodes the boundary frame."""
    pixels = codec.decode(latents)
    return codec.encode(pixels[:, -1:]).to(latents.device, latents.dtype)


def self_rollout(generator: WanModel, text: torch.Tensor, cfg: Config, noise: CellNoise, exit: int,
                 grad: bool, num_blocks: int | None = None, codec: Codec | None = None) -> torch.Tensor:
    """The generator's sample [B, num_training_frames, C, h, w]: the x0 predictions of step `exit` for
    the last `distill.num_training_frames` frames of a `num_blocks`-block rollout (default
    `rollout_blocks(noise.seed, cfg)`) in the configured order.

    With `grad`, the exit step's cells of the window's blocks carry autograd, except a first block the
    DMD loss leaves out (`window_loss_start`); nothing else does. That block's first frame is then
    `reencoded_frame` of the rollout up to it, by `codec` (default: the config's, built for this call;
    a training program passes the one it keeps)."""
    k, d = cfg.video.frames_per_block, cfg.distill
    num_blocks = rollout_blocks(noise.seed, cfg) if num_blocks is None else num_blocks
    first = num_blocks - d.num_training_frames // k  # the gradient window's first block
    if first < 0:
        raise ValueError(f"a {num_blocks}-block rollout is shorter than the {d.num_training_frames}-frame window")
    skip = window_loss_start(cfg, num_blocks) // k  # 1: the first block is out of the loss, so no grad
    cells = (lambda n, j: j == exit and n >= first + skip) if grad else None
    with torch.set_grad_enabled(grad):
        runner = CellRunner(generator, text, cfg, noise, exit_step=exit, grad_cells=cells)
        blocks = dict(run_order(runner, num_blocks))
    window = torch.cat([blocks[n] for n in range(first, num_blocks)], dim=1)
    if not skip:
        return window
    # As the reference: decode every frame up to the window's first, keep the last pixel frame.
    before = torch.cat([blocks[n] for n in range(first)] + [window[:, :1]], dim=1)
    image = reencoded_frame(before, codec if codec is not None else build_codec(cfg, window.device))
    return torch.cat([image, window[:, 1:]], dim=1)


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
        self.draw, self.t_min, self.t_max = d.timestep_draw, d.t_min, d.t_max
        self.context_share = d.context_share

    def timesteps(self, batch: int) -> torch.Tensor:
        """One noise level a sample: t = 1000 shift(u), clamped to [1000 t_min, 1000 t_max], with u
        drawn as distill.timestep_draw says: k / 1000 for an integer k ~ U{0, ..., 999}, the
        reference's lattice (clamp_after_shift), or u ~ U(t_min, t_max) (range_before_shift)."""
        if self.draw == "clamp_after_shift":
            u = torch.randint(NUM_TRAIN_TIMESTEPS, (batch,)).double() / NUM_TRAIN_TIMESTEPS
        else:
            u = self.t_min + (self.t_max - self.t_min) * torch.rand(batch, dtype=torch.float64)
        return self.flow.timestep(self.flow.shifted(u).clamp(self.t_min, self.t_max))

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The timesteps the samples `x` [B, F, ...] are noised to: one a sample (`timesteps`), or with
        distill.context_share a level a frame [B, F], where that share of the samples has its first frame
        at CONTEXT_LEVEL: the teacher and the critic then score continuations of the student's own first
        frame, the case in which a teacher trained with a nearly clean first frame hears the direction
        word (docs/toy_prompts.md, "DMD on continuations"). Without it no extra draw is made, so runs
        keep their levels."""
        t = self.timesteps(x.shape[0])
        if not self.context_share:
            return t
        t = t[:, None].repeat(1, x.shape[1])
        given = torch.rand(x.shape[0]) < self.context_share
        t[given, 0] = self.flow.timestep(torch.tensor(CONTEXT_LEVEL, dtype=t.dtype))
        return t

    def real_x0(self, xt: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The real score: the teacher's x0 under CFG with scale s, x0_neg + s (x0_text - x0_neg), which
        is the reference's x0_text + (s - 1)(x0_text - x0_neg). Guiding the flow, as `guided` does, is
        the same: at fixed (x_t, t) the x0 is affine in the flow and the weights sum to one."""
        return self.flow.x0_from_flow(xt, guided(self.teacher, text, self.negative, self.scale)(xt, t), t)

    def generator_loss(self, x: torch.Tensor, text: torch.Tensor, critic: WanModel,
                       loss_from: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """0.5 ||x - stopgrad(x - g)||^2, the mean over the frames from `loss_from` on (the reference's
        gradient_mask, `window_loss_start`): its gradient in those frames is g / their numel. g sees
        the whole window (its normaliser too), as the reference's does."""
        with torch.no_grad():
            t = self.levels(x)
            xt = self.flow.add_noise(x, torch.randn_like(x), t)
            real_x0 = self.real_x0(xt, t, text)
            fake_x0 = self.flow.x0_from_flow(xt, critic(xt, t, text), t)
            g = dmd_gradient(x, real_x0, fake_x0)[:, loss_from:]
        kept = x[:, loss_from:].double()
        loss = 0.5 * (kept - (kept - g).detach()).square().mean()
        level = t.reshape(len(t), -1)[:, -1]  # the sample's level, not its given first frame's
        return loss, {"dmd_grad_norm": g.norm().item() / g.numel() ** 0.5, "dmd_t": level.mean().item()}

    def critic_loss(self, critic: WanModel, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Flow matching on the generator's (detached) samples: the critic tracks their distribution."""
        x = x.detach()
        t = self.levels(x)
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

    `batch`: points [B, K, F, ...] (the teacher's trajectory, one point a student step:
    `hiar.config.kept_indices`), their exact timesteps [B, K], final [B, F, ...] (the point after the last one, at
    t = 0), from `hiar.trajectories.trajectory_batch`. As in the reference (model/timestep_forcing_dmd.py,
    pd_loss_type x0, pd_x0_target_mode pred_x0): the chord of step j runs through points j and j + 1
    at their stored levels, and the student sees x_j told its own step t_j (distill.fkl_timestep=
    student; "stored": the point's level), its x0 taken at that t_j. The reference trains one j a
    update, drawn in [0, fkl_steps); the mean over j is that draw's expectation (for fkl_steps = 1,
    the default, the same loss).
    """
    points, ts, final = batch["points"], batch["timesteps"], batch["final"]
    num_points = points.shape[1]
    attention, flow = forward_kl_attention(cfg), FlowMatching(cfg.schedule.shift)
    student = cfg.schedule.timesteps
    losses = []
    for j in range(min(cfg.distill.fkl_steps, num_points)):
        x_j, t_j = points[:, j], ts[:, j]
        x_next, t_next = (points[:, j + 1], ts[:, j + 1]) if j + 1 < num_points else (final, torch.zeros_like(t_j))
        target = chord_x0(x_j, x_next, t_j, t_next)
        t_in = torch.full_like(t_j, student[j]) if cfg.distill.fkl_timestep == "student" else t_j
        x0 = flow.x0_from_flow(x_j, generator(x_j, t_in, text, attention), t_in)
        losses.append((x0.double() - target).square().mean())
    return torch.stack(losses).mean()


class Distillation:
    """One training iteration of data-free distillation as named steps, over the run's objects: the
    generator and critic `trainer` updates, the frozen `teacher` (the real score), the generator's
    `ema`, the prompt states `bank`, the rollouts' `prompts` and the forward-KL term's `trajectories`
    (None without it). `iteration` is `Trainer.fit`'s step function, `sample` its on_sample.

    Prompts and trajectories are each read in a seeded order that is reshuffled every epoch and split
    over the ranks (`hiar.order`); exit steps and rollout noise are functions of (train.seed, step), and
    DMD's noise levels come from the global RNG that `Trainer.fit` seeds every step, so a resumed run
    draws what the uninterrupted one would have."""

    def __init__(self, cfg: Config, trainer: Trainer, generator: WanModel, critic: WanModel, teacher: WanModel,
                 ema: EMA, bank: PromptBank, prompts: PromptSource, trajectories: Sequence[dict] | None):
        world, seed = trainer.world, cfg.train.seed
        self.cfg, self.trainer, self.generator, self.critic, self.ema = cfg, trainer, generator, critic, ema
        self.bank, self.prompts, self.trajectories, self.device = bank, prompts, trajectories, world.device
        self.prompt_order = ShuffledOrder(prompts.size, seed, world.size, world.rank)
        self.trajectory_order = ShuffledOrder(len(trajectories), seed, world.size, world.rank) if trajectories else None
        self.dmd = DMD(teacher, bank([cfg.train.negative_prompt]), cfg)
        self.codec = functools.cache(lambda: build_codec(cfg, self.device))  # built when first needed, once (Wan VAE)

    def prompt_draw(self, step: int, critic: bool, micro: int) -> int:
        """Every update reads fresh prompts: draws are numbered by the updates made before this one
        (the critic's every step, the generator's every dfake_gen_update_ratio-th, before the critic's)."""
        ratio = self.cfg.distill.dfake_gen_update_ratio
        updates = step + updates_before(step, ratio)
        if critic and step % ratio == 0:
            updates += 1  # this step's generator update came first
        return updates * self.trainer.accumulation + micro

    def update_prompts(self, step: int, critic: bool, micro: int) -> tuple[list[int], torch.Tensor]:
        """The prompt indices and prompt states of micro-step `micro` of an update."""
        ids = self.prompt_order.draw(self.prompt_draw(step, critic, micro), self.cfg.train.batch_size)
        return ids, self.bank([self.prompts[i] for i in ids])

    def rollout(self, ids: list[int], text: torch.Tensor, step: int, role: str, micro: int, exit: int,
                grad: bool) -> tuple[torch.Tensor, int]:
        """The sample and the number of frames in front of the window the loss leaves out."""
        # Own noise streams for the generator's and the critic's rollouts, a function of (step, micro-step);
        # the rollout's length (longer rollouts than the window) is drawn from the same key.
        noise = block_noise(self.cfg, stable_hash(self.cfg.train.seed, role, step, micro) >> 1, ids, self.device)
        num_blocks = rollout_blocks(noise.seed, self.cfg)
        loss_from = window_loss_start(self.cfg, num_blocks)  # > 0: the window's first frame is re-encoded
        x = self_rollout(self.generator, text, self.cfg, noise, exit, grad, num_blocks,
                         self.codec() if loss_from else None)
        return x, loss_from

    def forward_kl(self, step: int, micro: int) -> torch.Tensor:
        """`forward_kl_loss` on fresh teacher trajectories: draws are numbered by generator updates, the
        only updates that run this term, so an epoch reads every trajectory once."""
        d = self.cfg.distill
        draw = step // d.dfake_gen_update_ratio * self.trainer.accumulation + micro
        batch = trajectory_batch(self.trajectories, self.trajectory_order.draw(draw, self.cfg.train.batch_size))
        on_device = {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in batch.items()}
        return forward_kl_loss(self.generator, on_device, self.bank(batch["captions"]), self.cfg)

    def generator_loss(self, step: int, exit: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD on the generator's own rollout, plus distill.fkl_weight x the forward-KL term."""
        ids, text = self.update_prompts(step, False, micro)
        x, loss_from = self.rollout(ids, text, step, "generator", micro, exit, grad=True)
        loss, metrics = self.dmd.generator_loss(x, text, self.critic, loss_from)
        metrics["dmd_loss"] = loss.item()
        if self.trajectories is not None:
            fkl = self.forward_kl(step, micro)
            metrics["fkl_loss"] = fkl.item()
            loss = loss + self.cfg.distill.fkl_weight * fkl
        return loss, metrics

    def critic_loss(self, step: int, exit: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow matching on a rollout of its own, made without grad."""
        ids, text = self.update_prompts(step, True, micro)
        with torch.no_grad():
            x, _ = self.rollout(ids, text, step, "critic", micro, exit, grad=False)  # the critic sees every frame
        return self.dmd.critic_loss(self.critic, x, text), {}

    def generator_update(self, step: int, exit: int) -> dict[str, float]:
        """One generator update over micro-steps, then the EMA of its weights."""
        update = self.trainer.optimize("generator", lambda micro: self.generator_loss(step, exit, micro))
        self.ema.update(self.generator, step)
        return {key if key.startswith(("dmd", "fkl")) else f"generator_{key}": v for key, v in update.items()}

    def critic_update(self, step: int, exit: int) -> dict[str, float]:
        update = self.trainer.optimize("critic", lambda micro: self.critic_loss(step, exit, micro))
        return {f"critic_{key}": v for key, v in update.items()}

    def iteration(self, step: int) -> dict[str, float]:
        """Training step `step`: one exit step for every rollout of the step; every
        distill.dfake_gen_update_ratio-th step the generator update, then always the critic update."""
        d = self.cfg.distill
        exit = exit_step(self.cfg.train.seed, step, d.min_exit_step, len(self.cfg.schedule.denoising_steps))
        metrics: dict[str, float] = {"exit_step": exit}
        if step % d.dfake_gen_update_ratio == 0:
            metrics.update(self.generator_update(step, exit))
        metrics.update(self.critic_update(step, exit))
        return metrics

    def sample(self, step: int) -> None:
        """Sample videos of the first prompts with the current generator, in the configured order (under
        ZeRO-3 every rank runs the forwards, which gather parameters collectively; rank 0 writes)."""
        model = self.trainer.sampling_module("generator")
        if model is None:
            return
        cfg, captions = self.cfg, [self.prompts[i] for i in range(2)]
        with torch.no_grad():
            blocks = generate(model, self.bank(captions), cfg, block_noise(cfg, 0, range(len(captions)), self.device),
                              cfg.geometry.num_blocks)
            if not self.trainer.world.is_main:
                for _ in blocks:  # the same forwards as rank 0, nothing written
                    pass
                return
            folder = self.trainer.out / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            paths = [folder / f"step-{step:08d}-{i}.mp4" for i in range(len(captions))]
            render(self.codec(), cfg, blocks, paths)
        self.trainer.log(f"samples: {', '.join(map(str, paths))}")

    def export(self) -> None:
        """The final generator as model.safetensors, its EMA once started (what inference uses), when the
        run has made every step (a run stopped early resumes instead)."""
        if self.trainer.step >= self.cfg.train.steps:
            self.trainer.log(f"model: {self.trainer.export(name='generator', ema=self.ema)}")
