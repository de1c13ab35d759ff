"""The toy world's teacher training (train/teacher.py): its loop (`train_teacher`), batches of rendered
clips, the flow-matching loss, caption dropout for classifier-free guidance, and teacher sample videos.
Full scale starts from the published Wan2.1 teacher instead, so nothing here runs there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hiar import distributed
from hiar.checkpoints import load_generator
from hiar.codecs import Codec, build_codec, rendered_frames
from hiar.config import Config, repo_path
from hiar.data import load_prompts, toy_caption
from hiar.flow import CONTEXT_LEVEL, FlowMatching
from hiar.models import AttentionMode, Bidirectional, WanModel
from hiar.order import ShuffledOrder
from hiar.sampling import guided, teacher_ode
from hiar.text import PromptBank
from hiar.toyworld import ToyClip, clip_to_video, sample_clip
from hiar.training import EMA, Trainer, seed_step

Batch = Callable[[Sequence[int]], tuple[torch.Tensor, list[str]]]  # clip indices -> latents (CPU), captions


def toy_batch(cfg: Config, codec: Codec, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Latents [B, F, C, h, w] (on the CPU) and captions (style train.captions) of the toy world's clips
    `indices`: F = video.num_latent_frames, from the video frames the codec needs for them."""
    v, t = cfg.video, cfg.train
    clips = [sample_clip(t.seed, i, v.height, v.width, motion=v.toy_motion) for i in indices]
    latents = encode_clips(codec, clips, rendered_frames(cfg))
    return latents, [toy_caption(c, t.seed, i, t.captions) for c, i in zip(clips, indices)]


def encode_clips(codec: Codec, clips: Sequence[ToyClip], frames: int) -> torch.Tensor:
    """The clips' first `frames` frames, rendered and encoded."""
    return codec.encode(torch.stack([torch.from_numpy(clip_to_video(clip.render(frames))) for clip in clips]))


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, text: torch.Tensor, flow: FlowMatching,
                       attention: AttentionMode = Bidirectional(), frame_noise: float = 0.0,
                       context_noise: float = 0.0, context_noise_min: float = 0.0) -> torch.Tensor:
    """MSE between the predicted and the true flow at shifted-uniform noise levels (`noise_levels`)."""
    sigma = noise_levels(flow, x0.shape[0], x0.shape[1], frame_noise, context_noise, context_noise_min).to(x0.device)
    return flow_errors(model, x0, text, flow, sigma, torch.randn_like(x0), attention).mean()


CONTEXT_TRAINING_LEVEL = 0.2  # train.context_noise: the first latent frame's level is drawn from [0, this]


def noise_levels(flow: FlowMatching, batch: int, frames: int, frame_noise: float = 0.0,
                 context_noise: float = 0.0, context_noise_min: float = 0.0) -> torch.Tensor:
    """Levels sigma [B, F], shifted-uniform: one a sample; or with probability `frame_noise` one a latent
    frame of that sample (diffusion forcing; train.frame_noise); or with probability `context_noise` one
    for all frames but the first, which is nearly clean (train.context_noise), that one mapped into
    [context_noise_min, 1] (train.context_noise_min)."""
    sigma = flow.shifted(torch.rand(batch))[:, None].repeat(1, frames)
    kind = torch.rand(batch)
    per_frame = kind < frame_noise
    sigma[per_frame] = flow.shifted(torch.rand(int(per_frame.sum()), frames))
    if context_noise:  # draws nothing otherwise, so runs without it keep their levels
        context = (kind >= frame_noise) & (kind < frame_noise + context_noise)
        sigma[context, 1:] = context_noise_min + (1 - context_noise_min) * sigma[context, 1:]
        sigma[context, 0] = CONTEXT_TRAINING_LEVEL * torch.rand(int(context.sum()))
    return sigma


def flow_errors(model: torch.nn.Module, x0: torch.Tensor, text: torch.Tensor, flow: FlowMatching,
                sigma: torch.Tensor, noise: torch.Tensor, attention: AttentionMode = Bidirectional(),
                scored: slice = slice(None)) -> torch.Tensor:
    """Per-sample MSE [B] of the predicted flow of x0 noised by `noise` to levels `sigma` [B] (or [B, F]:
    a level per latent frame), over the latent frames `scored`."""
    t = flow.timestep(sigma)
    pred = model(flow.add_noise(x0, noise, t), t, text, attention)
    return (pred.float() - flow.flow_target(x0, noise).float())[:, scored].square().flatten(1).mean(1)


def drop_captions(captions: list[str], p: float, negative: str) -> list[str]:
    """Replace each caption by the negative prompt with probability p (classifier-free guidance)."""
    return [negative if torch.rand(()) < p else c for c in captions]


@torch.no_grad()
def teacher_samples(model: WanModel, cfg: Config, text: torch.Tensor, negative: torch.Tensor,
                    seed: int, context: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents [B, F, C, h, w] for prompt states `text` [B, Lt, D]: the teacher's ODE with CFG
    against `negative` (train.sample_steps Euler steps, shift train.sample_shift), noise from `seed`. With
    `context` (clean latents [B, c, C, h, w]) the first c frames are given, noised to CONTEXT_LEVEL, and
    the ODE draws the rest: the clip continued from its start (image-to-video for c = 1)."""
    t, geo = cfg.train, cfg.geometry
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(text.shape[0], geo.num_latent_frames, cfg.model.in_channels, geo.latent_height,
                        geo.latent_width, generator=generator).to(text.device)
    flow = FlowMatching(t.sample_shift)
    given = None
    if context is not None:
        t_c = float(flow.timestep(torch.tensor(CONTEXT_LEVEL)))
        given = (flow.add_noise(context, torch.randn(context.shape, generator=generator).to(context.device), t_c), t_c)
    x0, _ = teacher_ode(guided(model, text, negative, t.guidance_scale), flow.sampling_timesteps(t.sample_steps),
                        noise, flow, context=given)
    return x0


def write_teacher_samples(model: WanModel, codec: Codec, bank: PromptBank, cfg: Config, prompts: Sequence[str],
                          folder: Path, tag: str, write: bool = True) -> list[Path]:
    """Sample each prompt with the teacher ODE and CFG; write mp4s named <tag>-<i>.mp4 (with `write`:
    under ZeRO-3 every rank samples, one writes)."""
    from hiar.video import VideoWriter

    x0 = teacher_samples(model, cfg, bank(prompts), bank([cfg.train.negative_prompt]), seed=0)
    if not write:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, video in enumerate(codec.decode(x0)):
        paths.append(folder / f"{tag}-{i}.mp4")
        with VideoWriter(paths[-1], cfg.video.fps, cfg.video.height, cfg.video.width) as w:
            w.write(video)
    return paths


def train_teacher(cfg: Config, resume: bool = False, batch: Batch | None = None,
                  on_sample: Callable[[torch.nn.Module, int], None] | None = None) -> torch.nn.Module | None:
    """Train a bidirectional teacher by flow matching under train.output_dir (train/teacher.py) and
    return the weights it samples with (the EMA with train.ema_decay; None on ranks that hold none).

    `batch(indices)` gives the latents and captions of training clips `indices` (default: the toy
    world's, `toy_batch`); `on_sample(model, step)` runs every train.sample_every steps (default: sample
    videos of the first two runtime.prompts). A diagnostic that trains on a world of its own passes both
    (scripts/direction_word_diagnostic.py) and gets this loop, its checkpoints and --resume with them."""
    t = cfg.train
    world = distributed.init()
    codec, bank = build_codec(cfg, world.device), PromptBank.for_config(cfg, world.device)
    flow = FlowMatching(t.timestep_shift)
    seed_step(t.seed, step=-1, rank=0)  # the initial weights, identical on every rank and run
    ema = EMA(t.ema_decay, t.ema_start, keep=world.is_main) if t.ema_decay else None
    model = load_generator(repo_path(t.init_weights), cfg)[0] if t.init_weights else WanModel(cfg.model)
    trainer = Trainer(cfg, model, resume=resume, extra={"ema": ema} if ema else None, world=world)
    clips = ShuffledOrder(None, t.seed, world.size, world.rank)  # the toy world is an endless stream of clips
    batch = batch or (lambda indices: toy_batch(cfg, codec, indices))
    if on_sample is None:
        prompts = load_prompts(repo_path(cfg.runtime.prompts))[:2]

        def on_sample(model: torch.nn.Module, step: int) -> None:
            paths = write_teacher_samples(model, codec, bank, cfg, prompts, trainer.out / "samples",
                                          f"step-{step:08d}", write=world.is_main)
            for path in paths:
                trainer.log(f"sample: {path}")

    def micro_loss(step: int, micro: int) -> torch.Tensor:
        x0, captions = batch(clips.draw(step * trainer.accumulation + micro, t.batch_size))
        text = bank(drop_captions(captions, t.caption_dropout, t.negative_prompt))
        return flow_matching_loss(trainer.engine, x0.to(world.device), text, flow, frame_noise=t.frame_noise,
                                  context_noise=t.context_noise, context_noise_min=t.context_noise_min)

    def step_fn(step: int) -> dict[str, float]:
        metrics = trainer.update(lambda micro: micro_loss(step, micro))
        if ema is not None:
            ema.update(trainer.model, step)
        return metrics

    def sample(step: int) -> None:
        model = trainer.sampling_module(ema=ema)
        if model is not None:
            on_sample(model, step)

    trainer.fit(step_fn, sample)
    if trainer.step >= t.steps:
        trainer.log(f"model: {trainer.export(ema=ema)}")
    return trainer.sampling_module(ema=ema)
