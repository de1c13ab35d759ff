"""A generation as a Python stream: decoded blocks as they finish, steerable between blocks.

    stream = Stream.start(model, codec, cfg, conditioning, noise)   # nothing runs yet
    for block in stream:            # (block index, clean latents, decoded frames), one block at a time
        show(block.frames)
        if wants_new_prompt:
            stream.switch(encoder([new_prompt]), (new_prompt,))   # from the next block not yet started

Pulling drives the generation, so a consumer that stops pulling pauses it and one that pulls again
resumes it; nothing runs ahead. inference.py and long rollouts write files from a stream
(hiar/render.py); a live demo would send its frames to a browser from the same loop. A switch takes
effect at the first block that has not started its first cell (hiar/conditioning.py: a prompt belongs
to a block), so with the wavefront schedule blocks already in flight finish under the prompt they
started with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hiar.codecs import Codec
from hiar.conditioning import Conditioning
from hiar.config import Config
from hiar.models import WanModel
from hiar.sampling import Blocks, CellNoise, CellRunner, run_order


@dataclass
class DecodedBlock:
    index: int
    latents: torch.Tensor  # clean latents [B, k, C, h, w]
    frames: torch.Tensor  # decoded video frames [B, f, 3, H, W] in [-1, 1]


class Stream:
    def __init__(self, blocks: Blocks, codec: Codec, runner: CellRunner | None = None,
                 prefix: torch.Tensor | None = None, prefix_out: bool = True):
        """Decode `blocks` as they arrive. `runner` (the one producing them, sequentially) makes `switch`
        possible. `prefix` (clean latents before block 0) runs through the causal decoder first, so the
        blocks decode as the continuation they are; its frames lead the first block's only with `prefix_out`."""
        self.runner, self._blocks, self._decoder = runner, blocks, codec.stream_decoder()
        self._prefix, self._prefix_out = prefix, prefix_out

    @classmethod
    def start(cls, model: WanModel, codec: Codec, cfg: Config, cond: Conditioning, noise: CellNoise,
              num_blocks: int | None = None, on_cell=None, prefix_out: bool = True) -> Stream:
        """A stream of `num_blocks` blocks (None: without end, in the wavefront schedule)."""
        runner = CellRunner(model, cond, cfg, noise, on_cell=on_cell)
        return cls(run_order(runner, num_blocks), codec, runner, cond.prefix, prefix_out)

    def switch(self, states: torch.Tensor, text: tuple[str, ...] = ()) -> int:
        """Use the prompt `states` [B, text_len, text_dim] from the next block not yet started; returns that block."""
        if self.runner is None:
            raise RuntimeError("this stream has no cell runner (a pipeline's last stage): it cannot switch prompts")
        block = self.runner.blocks_started
        self.runner.cond.switch(block, states, text)
        return block

    def __iter__(self) -> Iterator[DecodedBlock]:
        return self

    @torch.no_grad()
    def __next__(self) -> DecodedBlock:
        head = None
        if self._prefix is not None:
            head, self._prefix = self._decoder.decode(self._prefix), None
        n, x0 = next(self._blocks)
        frames = self._decoder.decode(x0)
        if head is not None and self._prefix_out:
            frames = torch.cat([head.to(frames.dtype), frames], dim=1)
        return DecodedBlock(n, x0, frames)
