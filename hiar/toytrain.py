"""What the toy-world training programs share: batches of rendered clips, cached prompt states, the
flow-matching loss, and teacher sample videos."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from hiar.codecs import Codec
from hiar.config import Config
from hiar.flow import FlowMatching
from hiar.models import AttentionMode, Bidirectional, WanModel
from hiar.ode import trajectory_batch
from hiar.sampling import guided, teacher_ode
from hiar.text import TextEncoder, build_text_encoder
from hiar.toyworld import clip_to_video, sample_clip


class PromptBank:
    """Prompt states by caption. Captions not held are encoded together in one call; states are kept
    in host memory, least recently used first out, up to `max_bytes` (toy captions repeat across the
    world; full-scale prompts mostly do not, and an unbounded cache of 8 MiB umT5 states grows without
    end). Returns states [B, text_len, text_dim] on `device`."""

    def __init__(self, encoder: TextEncoder, max_bytes: int, device: torch.device | str = "cpu"):
        self.encoder, self.max_bytes, self.device = encoder, max_bytes, torch.device(device)
        self._held: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    @classmethod
    def for_config(cls, cfg: Config, device: torch.device) -> PromptBank:
        """The config's text encoder on `device` (or the CPU with runtime.offload_text_encoder), a cache
        of train.prompt_cache_mb MiB."""
        return cls(build_text_encoder(cfg, device), cfg.train.prompt_cache_mb * 2**20, device)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._held))
        fresh = dict(zip(missing, self.encoder(missing).cpu())) if missing else {}
        states = torch.stack([fresh[c] if c in fresh else self._held[c] for c in captions])
        for caption in captions:
            if caption in self._held:
                self._held.move_to_end(caption)
        for caption, state in fresh.items():
            self._held[caption] = state
            self._bytes += state.nbytes
        while self._bytes > self.max_bytes:
            self._bytes -= self._held.popitem(last=False)[1].nbytes
        return states.to(self.device)


def toy_batch(cfg: Config, codec: Codec, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Latents [B, F, C, h, w] (on the CPU) and captions of the toy world's clips `indices`."""
    v = cfg.video
    clips = [sample_clip(cfg.train.seed, i, v.height, v.width) for i in indices]
    video = torch.stack([torch.from_numpy(clip_to_video(c.render(v.num_latent_frames))) for c in clips])
    return codec.encode(video), [c.caption for c in clips]


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, text: torch.Tensor, flow: FlowMatching,
                       attention: AttentionMode = Bidirectional()) -> torch.Tensor:
    """MSE between the predicted and the true flow at shifted-uniform noise levels, one per sample."""
    sigma = flow.shifted(torch.rand(x0.shape[0]))
    noise = torch.randn_like(x0)
    t = flow.timestep(sigma)
    pred = model(flow.add_noise(x0, noise, t), t, text, attention)
    return (pred.float() - flow.flow_target(x0, noise).float()).square().mean()


def drop_captions(captions: list[str], p: float, negative: str) -> list[str]:
    """Replace each caption by the negative prompt with probability p (classifier-free guidance)."""
    return [negative if torch.rand(()) < p else c for c in captions]


@torch.no_grad()
def teacher_samples(model: WanModel, cfg: Config, text: torch.Tensor, negative: torch.Tensor,
                    seed: int) -> torch.Tensor:
    """Clean latents [B, F, C, h, w] for prompt states `text` [B, Lt, D]: the teacher's ODE with CFG
    against `negative` (train.sample_steps Euler steps, shift train.sample_shift), noise from `seed`."""
    t, geo = cfg.train, cfg.geometry
    noise = torch.randn(text.shape[0], geo.num_latent_frames, cfg.model.in_channels, geo.latent_height,
                        geo.latent_width, generator=torch.Generator().manual_seed(seed)).to(text.device)
    flow = FlowMatching(t.sample_shift)
    x0, _ = teacher_ode(guided(model, text, negative, t.guidance_scale), flow.sampling_timesteps(t.sample_steps),
                        noise, flow)
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


def ode_regression_batch(trajectories: Sequence[dict], cfg: Config,
                         indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The ODE-regression batch of trajectories `indices`: for every block a random stored point.

    Returns inputs x [B, F, C, h, w], per-frame timesteps [B, F], targets (the trajectories' clean
    ends) and captions, on the CPU.
    """
    batch = trajectory_batch(trajectories, indices)
    b, num_points, frames = batch["points"].shape[:3]
    k = cfg.video.frames_per_block
    pick = torch.randint(num_points, (b, frames // k)).repeat_interleave(k, dim=1)  # [B, F]: one point per block
    rows = torch.arange(b)[:, None]
    x = batch["points"][rows, pick, torch.arange(frames)]
    return x, batch["timesteps"][rows, pick], batch["final"], batch["captions"]
