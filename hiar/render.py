"""Prompt -> latent blocks -> decoded frames -> files, streaming: what inference.py and long-rollout
evaluation run for each prompt."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

from hiar.codecs import Codec
from hiar.config import Config, config_to_dict
from hiar.sampling import Blocks
from hiar.stream import Stream
from hiar.video import Claim, VideoWriter, claimed


@dataclass
class Rendered:
    paths: list[Path]
    latent_frames: int
    video_frames: int  # per video
    seconds: float
    first_block_seconds: float  # latency until the first block was written


def render(codec: Codec, cfg: Config, blocks: Blocks | Stream, paths: Sequence[Path | Claim],
           latents_paths: Sequence[Path | Claim] | None = None, metadata: dict[str, str] | None = None) -> Rendered:
    """Decode (block, clean latents [B, k, C, h, w]) pairs as they arrive (a `Stream` decodes them; bare
    blocks get one) and append sample b's frames to paths[b]. With `latents_paths`, the final latents
    [F, C, h, w] are saved beside the videos (safetensors, with the resolved config and `metadata`).

    A path is replaced when it exists; pass `Claim`s (hiar.video.claim_free) to write only free names.
    Every file is published under its final name only when it is complete; when anything fails, what
    was written stays as `<name>.partial` and the error names the file.
    """
    start = time.perf_counter()
    first_block_s = None
    stream = blocks if isinstance(blocks, Stream) else Stream(blocks, codec)
    latent_claims = [claimed(p) for p in latents_paths or []]
    writers: list[VideoWriter] = []
    kept: dict[int, torch.Tensor] = {}
    num_blocks = 0
    try:
        for path in paths:
            writers.append(VideoWriter(path, cfg.video.fps, cfg.video.height, cfg.video.width))
        with torch.no_grad():
            for block in stream:
                for writer, video in zip(writers, block.frames):  # [B, f, 3, H, W]
                    writer.write(video)
                first_block_s = first_block_s or time.perf_counter() - start
                num_blocks += 1
                if latent_claims:
                    kept[block.index] = block.latents.float().cpu()
        close_all(writers)
    except BaseException:
        for writer in writers:
            writer.abort()  # nothing once closed
        for claim in latent_claims:
            claim.release()
        raise
    if latent_claims:
        save_latents(latent_claims, torch.cat([kept[n] for n in sorted(kept)], dim=1), cfg, metadata or {})
    return Rendered([w.path for w in writers], num_blocks * cfg.video.frames_per_block, writers[0].frames,
                    time.perf_counter() - start, first_block_s or 0.0)


def close_all(writers: Sequence[VideoWriter]) -> None:
    """Close (check and publish) every writer, then raise the first failure: one bad file does not
    cost the others."""
    errors = []
    for writer in writers:
        try:
            writer.close()
        except OSError as err:
            errors.append(err)
    if errors:
        raise errors[0]


def save_latents(claims: Sequence[Claim], latents: torch.Tensor, cfg: Config, metadata: dict[str, str]) -> None:
    """Sample b's latents [F, C, h, w] to claims[b] (safetensors with the config and `metadata`)."""
    info = {"config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False), **metadata}
    for i, (claim, lat) in enumerate(zip(claims, latents)):
        try:
            claim.write(save({"latents": lat.contiguous()}, metadata=info))
        except BaseException:
            for rest in claims[i + 1:]:
                rest.release()
            raise


def writable_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove it writable, or raise OSError saying so."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hiar_write_test.")  # a fresh name: nothing replaced
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"output folder {folder} is not writable: {err.strerror or err}") from None
    return folder
