"""The block-causal window rule: which earlier latent frames a query frame may see (docs/design.md, section 3).

Latent frames are cut into blocks of k frames from frame 0. A query frame in the block [b, b + k) sees
every frame of its own block and earlier frames, limited by a local window of W frames counted back
from the block's end, the block included, plus an optional sink of the first frames that stays
visible forever. One function, `BlockCausalWindow.frame_mask`, states it; the block-causal
full-sequence forward (hiar/models/attention.py) and the KV cache's eviction (hiar/models/cache.py)
both follow it, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hiar.config import VideoConfig


@dataclass(frozen=True)
class BlockCausalWindow:
    frames_per_block: int
    window_frames: int = 0  # W; 0 = unbounded
    sink_frames: int = 0
    # P clean frames given before the generated video (an image or a video's last frames): they form one
    # block [0, P) of their own, and the k-frame blocks start at P (hiar/conditioning.py).
    prefix_frames: int = 0
    # Frames before `floor` are no context of this cache: a re-cache after a prompt switch rebuilds only
    # the frames the cache still held, so the oldest of them sees the rebuilt frames only.
    floor: int = 0

    @classmethod
    def from_config(cls, video: VideoConfig, prefix_frames: int = 0) -> BlockCausalWindow:
        return cls(video.frames_per_block, video.window_frames, video.sink_frames, prefix_frames)

    def block_end(self, frame: torch.Tensor) -> torch.Tensor:
        k, p = self.frames_per_block, self.prefix_frames
        return torch.where(frame < p, p, ((frame - p) // k + 1) * k + p)

    def is_block_start(self, frame: int) -> bool:
        p = self.prefix_frames
        return frame == 0 or (frame >= p and (frame - p) % self.frames_per_block == 0)

    def frame_mask(self, query_frames: torch.Tensor, key_frames: torch.Tensor) -> torch.Tensor:
        """[Fq, Fk] bool: may query frame q see key frame f? Frames are absolute indices."""
        end = self.block_end(query_frames)[:, None]  # [Fq, 1]
        key = key_frames[None, :]  # [1, Fk]
        visible = key < end
        if self.window_frames:
            recent = key >= end - (self.window_frames - self.sink_frames)
            visible &= recent | (key < self.sink_frames)
        return visible

    def context_frames(self, start: int, end: int) -> list[int]:
        """Frames before `start` that some query frame in [start, end) sees, in increasing order.

        The first block of the range sees the most (later blocks' windows start later), so its window
        bounds the union. Equal to the columns < start that `frame_mask` opens for those queries.
        """
        if not self.is_block_start(start):
            raise ValueError(f"a cached call must start on a block boundary; frame {start} is not "
                             f"{self.prefix_frames} + a multiple of frames_per_block={self.frames_per_block}")
        if not self.window_frames:
            return list(range(self.floor, start))
        first_end = int(self.block_end(torch.tensor(start)))
        recent_from = max(self.sink_frames, first_end - (self.window_frames - self.sink_frames), self.floor)
        return list(range(min(self.sink_frames, start))) + list(range(recent_from, start))
