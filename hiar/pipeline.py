"""Prompt -> latent blocks -> decoded frames -> files, streaming: what inference.py and long-rollout
evaluation run for each prompt."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from hiar.atomic import atomic_path
from hiar.codecs import Codec
from hiar.config import Config, config_to_dict
from hiar.models import WanModel
from hiar.sampling import CellNoise, SamplerStats, generate


@dataclass
class Rendered:
    paths: list[Path]
    latent_frames: int
    video_frames: int
    seconds: float
    stats: SamplerStats


@torch.no_grad()
def render(model: WanModel, codec: Codec, cfg: Config, text: torch.Tensor, num_blocks: int, seed: int,
           samples: Sequence[int], paths: Sequence[Path], latents_paths: Sequence[Path] | None = None,
           on_cell: Callable[[], None] | None = None, metadata: dict[str, str] | None = None) -> Rendered:
    """Generate one video per sample index (all for the prompt states `text` [1, Lt, D]) and write each
    block to its mp4 as soon as it is clean. With `latents_paths`, the final latents [F, C, h, w]
    are saved beside the videos (safetensors, with the resolved config)."""
    from hiar.video import VideoWriter

    geo, device = cfg.geometry, next(model.parameters()).device
    block_shape = (cfg.video.frames_per_block, model.config.in_channels, geo.latent_height, geo.latent_width)
    noise = CellNoise(seed, samples, block_shape, device)
    stats = SamplerStats()
    start = time.perf_counter()
    decoder = codec.stream_decoder()
    writers = [VideoWriter(p, cfg.video.fps, cfg.video.height, cfg.video.width) for p in paths]
    blocks: dict[int, torch.Tensor] = {}
    try:
        texts = text.expand(len(samples), -1, -1)
        for n, x0 in generate(model, texts, cfg, noise, num_blocks, stats, on_cell):
            frames = decoder.decode(x0)  # [B, f, 3, H, W]
            for writer, video in zip(writers, frames):
                writer.write(video)
            if latents_paths:
                blocks[n] = x0.float().cpu()
    finally:
        for writer in writers:
            writer.close()
    if latents_paths:
        latents = torch.cat([blocks[n] for n in sorted(blocks)], dim=1)
        info = {"config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **(metadata or {})}
        for path, sample, lat in zip(latents_paths, samples, latents):
            with atomic_path(path) as tmp:
                save_file({"latents": lat.contiguous()}, str(tmp), metadata={**info, "sample": str(sample),
                                                                           "seed": str(seed)})
    return Rendered(list(paths), num_blocks * cfg.video.frames_per_block, writers[0].frames,
                    time.perf_counter() - start, stats)


def writable_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove it writable, or raise OSError saying so."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".hiar_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output folder {folder} is not writable: {err.strerror or err}") from None
    return folder
