"""Video files: a streaming mp4 writer that survives crashes, and a reader.

The writer emits fragmented MP4 (an index after every keyframe), so a run that dies after an hour
leaves a playable file with everything written so far. ffmpeg comes from the imageio-ffmpeg package.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class VideoWriter:
    """Append frames [F, 3, H, W] in [-1, 1] to an H.264 mp4 as they are produced."""

    def __init__(self, path: str | os.PathLike, fps: int, height: int, width: int):
        import imageio_ffmpeg

        self.path = Path(path)
        self.frames = 0
        self._writer = imageio_ffmpeg.write_frames(
            str(self.path), size=(width, height), fps=fps, codec="libx264", quality=8, pix_fmt_out="yuv420p",
            macro_block_size=1, output_params=["-movflags", "frag_keyframe+empty_moov"])
        self._writer.send(None)

    def write(self, frames: torch.Tensor) -> None:
        for frame in to_uint8(frames):
            self._writer.send(np.ascontiguousarray(frame))
            self.frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as [F, H, W, 3] uint8."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def video_fps(path: str | os.PathLike) -> float:
    """Frames per second in a video file's header (without decoding it)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return float(next(reader)["fps"])
    finally:
        reader.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write uint8 frames [F, H, W, 3] to an mp4 atomically (a crash leaves no half file)."""
    from hiar.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp_mp4 = tmp.with_suffix(".mp4")  # ffmpeg picks the container from the name
        frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, H, W] in [-1, 1]
        with VideoWriter(tmp_mp4, fps, frames.shape[1], frames.shape[2]) as writer:
            writer.write(frames_t)
        tmp_mp4.replace(tmp)
