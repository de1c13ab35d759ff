"""The toy world's teacher training (train/teacher.py): batches of rendered clips, the flow-matching
loss, caption dropout for classifier-free guidance, and teacher sample videos. Full scale starts from
the published Wan2.1 teacher instead, so nothing here runs there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hiar.codecs import Codec, rendered_frames
from hiar.config import Config
from hiar.data import toy_caption
from hiar.flow import FlowMatching
from hiar.models import AttentionMode, Bidirectional, WanModel
from hiar.sampling import guided, teacher_ode
from hiar.text import PromptBank
from hiar.toyworld import ToyClip, clip_to_video, sample_clip


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
                       context_noise: float = 0.0) -> torch.Tensor:
    """MSE between the predicted and the true flow at shifted-uniform noise levels (`noise_levels`)."""
    sigma = noise_levels(flow, x0.shape[0], x0.shape[1], frame_noise, context_noise).to(x0.device)
    return flow_errors(model, x0, text, flow, sigma, torch.randn_like(x0), attention).mean()


CONTEXT_TRAINING_LEVEL = 0.2  # train.context_noise: the first latent frame's level is drawn from [0, this]
CONTEXT_LEVEL = 0.05  # the level of given context frames when probing (hiar.toywords) and sampling


def noise_levels(flow: FlowMatching, batch: int, frames: int, frame_noise: float = 0.0,
                 context_noise: float = 0.0) -> torch.Tensor:
    """Levels sigma [B, F], shifted-uniform: one a sample; or with probability `frame_noise` one a latent
    frame of that sample (diffusion forcing; train.frame_noise); or with probability `context_noise` one
    for all frames but the first, which is nearly clean (train.context_noise)."""
    sigma = flow.shifted(torch.rand(batch))[:, None].repeat(1, frames)
    kind = torch.rand(batch)
    per_frame = kind < frame_noise
    sigma[per_frame] = flow.shifted(torch.rand(int(per_frame.sum()), frames))
    if context_noise:  # draws nothing otherwise, so runs without it keep their levels
        context = (kind >= frame_noise) & (kind < frame_noise + context_noise)
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
