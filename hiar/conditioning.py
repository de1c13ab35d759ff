"""What each block of a generation is conditioned on: its prompt, and the clean frames before the video.

A `Conditioning` is read by the cells, the orders, the pipeline stages and training alike
(docs/design.md, section "Steering"):

* prompts are scheduled by block: segment i holds from its `start_block` until the next segment's.
  A prompt belongs to a block, not to a moment, so every cell (n, j) of block n, whatever its step and
  whenever an order runs it, uses block n's prompt: blocks in flight when a switch is asked for keep
  the prompt they started with, and step_major, wavefront and pipelined runs stay identical;
* a block's context (its cache write) is computed under that block's prompt. What the caches hold
  for earlier blocks after a switch is the `switch` mode (config `sampling.switch`): `new_blocks`
  keeps their K/V as written under the old prompt; `recache` re-runs the frames the cache still holds
  under the new prompt, at the level they were written at, before the first block of the new prompt
  reads that cache (one rebuild per cache and switch);
* `prefix`: clean latent frames placed before block 0 (an image: one frame; a video: its last frames)
  and written at t = 0 into every cache before the first block. Generated blocks then start at frame
  P = prefix length: the window rule's blocks are the prefix [0, P), then k frames at a time
  (hiar/models/window.py).

Cross-attention K/V are computed once per prompt by the cell runner, never per block or step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hiar.video import read_video


@dataclass(frozen=True)
class Segment:
    start_block: int
    states: torch.Tensor  # prompt states [B, text_len, text_dim]
    text: tuple[str, ...] = ()  # the prompts, for records and file names (optional)


@dataclass
class Conditioning:
    segments: list[Segment]
    prefix: torch.Tensor | None = None  # clean latents [B, P, C, h, w] before block 0
    _starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.segments or self.segments[0].start_block != 0:
            raise ValueError("a prompt schedule starts at block 0")
        starts = [s.start_block for s in self.segments]
        if starts != sorted(set(starts)):
            raise ValueError(f"prompt switches must be at increasing blocks, got {starts}")
        batch = {s.states.shape[0] for s in self.segments} | ({self.prefix.shape[0]} if self.prefix is not None else set())
        if len(batch) != 1:
            raise ValueError(f"every prompt and the prefix must have the same batch size, got {sorted(batch)}")
        self._starts = starts

    @classmethod
    def of(cls, states: torch.Tensor | Conditioning) -> Conditioning:
        """One prompt for every block (a bare states tensor), or the conditioning itself."""
        return states if isinstance(states, Conditioning) else cls([Segment(0, states)])

    @property
    def batch_size(self) -> int:
        return self.segments[0].states.shape[0]

    @property
    def prefix_frames(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def segment_of(self, block: int) -> int:
        """Index of the segment whose prompt block `block` uses (the prefix, block -1, uses the first)."""
        return max(0, bisect.bisect_right(self._starts, block) - 1)

    def switch(self, start_block: int, states: torch.Tensor, text: tuple[str, ...] = ()) -> None:
        """Blocks from `start_block` on use `states` (a live switch: `start_block` is the first block
        not yet started, so no earlier than every switch before). A second switch before that block starts
        replaces the first: no cell has read its prompt yet."""
        if start_block < self._starts[-1]:
            raise ValueError(f"a switch at block {start_block} comes before the last one, at block {self._starts[-1]}")
        if states.shape[0] != self.batch_size:
            raise ValueError(f"the new prompt has batch {states.shape[0]}, the stream {self.batch_size}")
        if start_block == self._starts[-1]:
            self.segments[-1] = Segment(start_block, states, text)
            return
        self.segments.append(Segment(start_block, states, text))
        self._starts.append(start_block)

    def check_blocks(self, num_blocks: int | None) -> None:
        """Refuse, before compute, a switch at a block the video never reaches."""
        if num_blocks is not None and self._starts[-1] >= num_blocks:
            raise ValueError(f"the prompt schedule switches at block {self._starts[-1]}, but the video has "
                             f"{num_blocks} blocks (0..{num_blocks - 1})")


def first_video_frame(latent_frame: int, temporal_stride: int) -> int:
    """The first video frame that latent frame f decodes to: a causal video VAE gives latent frame 0 one
    frame and every later one `temporal_stride` frames (Wan: 4; the toy codec: 1)."""
    return 0 if latent_frame == 0 else 1 + temporal_stride * (latent_frame - 1)


def block_at_second(seconds: float, fps: float, temporal_stride: int, frames_per_block: int) -> int:
    """The first block whose first video frame is at or after `seconds` into the generated video."""
    if seconds < 0:
        raise ValueError(f"a switch time must not be negative, got {seconds} s")
    target = math.ceil(seconds * fps - 1e-9)
    block = 0
    while first_video_frame(block * frames_per_block, temporal_stride) < target:
        block += 1
    return block


def parse_switch_time(at: str, fps: float, temporal_stride: int, frames_per_block: int) -> int:
    """A switch time as written on the command line or in a schedule file: "b12" (block 12) or "2.5s"
    (the first block starting at or after 2.5 s of generated video) -> block index."""
    text = at.strip().lower()
    try:
        if text.startswith("b"):
            block = int(text[1:])
            if block < 0:
                raise ValueError
            return block
        if text.endswith("s"):
            return block_at_second(float(text[:-1]), fps, temporal_stride, frames_per_block)
    except ValueError:
        pass
    raise ValueError(f"switch time {at!r}: write a block as b<N> (e.g. b4) or seconds as <S>s (e.g. 2.5s)")


def read_schedule(lines: list[str], where: str) -> list[tuple[str, str]]:
    """(time, prompt) pairs of a schedule file: one switch a line, "<time> <prompt>"; blank lines and
    lines starting with # are skipped."""
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        at, _, prompt = line.partition(" ")
        if not prompt.strip():
            raise ValueError(f"{where}:{number}: expected '<time> <prompt>' (e.g. '2s a blue square ...'), got {line!r}")
        entries.append((at, prompt.strip()))
    return entries


def read_prefix_video(image: str | None, video: str | None, height: int, width: int,
                      temporal_stride: int) -> torch.Tensor | None:
    """The frames a generation continues, [1, F, 3, H, W] in [-1, 1]: an image (F = 1) or a video's
    frames (its last 1 + stride * m, the lengths a causal video VAE encodes whole), or None. Unreadable
    files and another resolution than the config generates raise ValueError naming the file."""
    if image is not None and video is not None:
        raise ValueError("give one of --image or --video, not both")
    path = image if image is not None else video
    if path is None:
        return None
    try:
        if image is not None:
            import imageio.v3 as iio

            frames = np.asarray(iio.imread(path))[None]
            frames = np.repeat(frames[..., None], 3, -1) if frames.ndim == 3 else frames[..., :3]  # grey, RGBA
        else:
            frames = read_video(path)
    except Exception as err:  # imageio and ffmpeg raise many kinds for a missing or broken file
        raise ValueError(f"cannot read {path}: {err}") from None
    if not len(frames):
        raise ValueError(f"{path} has no frames")
    h, w = frames.shape[1:3]
    if (h, w) != (height, width):
        raise ValueError(f"{path} is {w}x{h}, but this config generates {width}x{height} videos: resize it "
                         f"(e.g. ffmpeg -i IN -vf scale={width}:{height} OUT)")
    frames = frames[-(1 + temporal_stride * ((len(frames) - 1) // temporal_stride)):]
    return torch.from_numpy(frames.copy()).permute(0, 3, 1, 2)[None].float() / 127.5 - 1


def context_latents(latents: torch.Tensor, window_frames: int, frames_per_block: int) -> torch.Tensor:
    """The last latent frames the first generated block can see: W - k of them (all without a window)."""
    keep = window_frames - frames_per_block if window_frames else latents.shape[1]
    return latents[:, -keep:]
