"""Prompt -> latent blocks -> decoded frames -> files, streaming: what inference.py and long-rollout
evaluation run for each prompt."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from hiar.atomic import atomic_path
from hiar.codecs import Codec
from hiar.config import Config, config_to_dict
from hiar.sampling import Blocks


@dataclass
class Rendered:
    paths: list[Path]
    latent_frames: int
    video_frames: int  # per video
    seconds: float
    first_block_seconds: float  # latency until the first block was written


def render(codec: Codec, cfg: Config, blocks: Blocks, paths: Sequence[Path],
           latents_paths: Sequence[Path] | None = None, metadata: dict[str, str] | None = None) -> Rendered:
    """Decode (block, clean latents [B, k, C, h, w]) pairs as they arrive and append sample b's frames
    to paths[b]. With `latents_paths`, the final latents [F, C, h, w] are saved beside the videos
    (safetensors, with the resolved config and `metadata`)."""
    from hiar.video import VideoWriter

    start = time.perf_counter()
    first_block_s = None
    decoder = codec.stream_decoder()
    writers = [VideoWriter(p, cfg.video.fps, cfg.video.height, cfg.video.width) for p in paths]
    kept: dict[int, torch.Tensor] = {}
    num_blocks = 0
    try:
        with torch.no_grad():
            for n, x0 in blocks:
                for writer, video in zip(writers, decoder.decode(x0)):  # [B, f, 3, H, W]
                    writer.write(video)
                first_block_s = first_block_s or time.perf_counter() - start
                num_blocks += 1
                if latents_paths:
                    kept[n] = x0.float().cpu()
    finally:
        for writer in writers:
            writer.close()
    if latents_paths:
        latents = torch.cat([kept[n] for n in sorted(kept)], dim=1)
        info = {"config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **(metadata or {})}
        for path, lat in zip(latents_paths, latents):
            with atomic_path(path) as tmp:
                save_file({"latents": lat.contiguous()}, str(tmp), metadata=info)
    return Rendered(list(paths), num_blocks * cfg.video.frames_per_block, writers[0].frames,
                    time.perf_counter() - start, first_block_s or 0.0)


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
