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

With `overlap=True` the decoder of block n runs while block n + 1 is generated (on a worker thread; on
CUDA on a side stream of its own, so the two share the GPU), and a pull returns block n once block
n + 1 is generated: the generation runs exactly one block ahead of the consumer, never more, and a
switch lands one block later than without overlap. The frames are the same: the decoder sees the same
blocks in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hiar.codecs import Codec, StreamDecoder
from hiar.conditioning import Conditioning
from hiar.config import Config
from hiar.models import WanModel
from hiar.sampling import Blocks, CellNoise, CellRunner, run_order


@dataclass
class DecodedBlock:
    index: int
    latents: torch.Tensor  # clean latents [B, k, C, h, w]
    frames: torch.Tensor  # decoded video frames [B, f, 3, H, W] in [-1, 1]


class _InlineDecoding:
    """Decodes when asked, in the caller's thread and stream."""

    def __init__(self, decoder: StreamDecoder):
        self._decoder = decoder

    def submit(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decoder.decode(latents)

    def result(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded

    def close(self) -> None:
        pass


class _OverlappedDecoding:
    """Decodes in submission order on one worker thread (the causal decoder's cache needs that order).

    On CUDA the worker runs on a side stream: it waits for an event recorded where the latents were
    made, and the caller's stream waits for the decode's event before it reads the frames. Each tensor
    is marked as used on the stream that did not allocate it (`record_stream`), so the caching allocator
    does not hand its memory to the other stream while work on it is pending."""

    def __init__(self, decoder: StreamDecoder):
        self._decoder = decoder
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiar-decode")
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def submit(self, latents: torch.Tensor) -> Future:
        made = None
        if latents.is_cuda:
            made = torch.cuda.Event()
            made.record(torch.cuda.current_stream(latents.device))
        return self._worker.submit(self._decode, latents, made)

    def _decode(self, latents: torch.Tensor, made: torch.cuda.Event | None):
        with torch.no_grad():  # grad mode is per thread
            if made is None:
                return self._decoder.decode(latents), None
            side = self._side.setdefault(latents.device, torch.cuda.Stream(latents.device))
            with torch.cuda.device(latents.device), torch.cuda.stream(side):
                side.wait_event(made)
                frames = self._decoder.decode(latents)
                latents.record_stream(side)
                done = torch.cuda.Event()
                done.record(side)
            return frames, done

    def result(self, decoding: Future) -> torch.Tensor:
        frames, done = decoding.result()
        if done is not None and frames.is_cuda:
            current = torch.cuda.current_stream(frames.device)
            current.wait_event(done)
            frames.record_stream(current)
        return frames

    def close(self) -> None:
        self._worker.shutdown(wait=False)


class Stream:
    def __init__(self, blocks: Blocks, codec: Codec, runner: CellRunner | None = None,
                 prefix: torch.Tensor | None = None, prefix_out: bool = True, overlap: bool = False,
                 num_blocks: int | None = None):
        """Decode `blocks` as they arrive. `runner` (the one producing them, sequentially) makes `switch`
        possible. `prefix` (clean latents before block 0) runs through the causal decoder first, so the
        blocks decode as the continuation they are; its frames lead the first block's only with `prefix_out`.
        `overlap`: decode block n while block n + 1 is generated (module docstring). `num_blocks`, when
        known, lets `switch` refuse a switch no block can take."""
        self.runner, self._blocks = runner, blocks
        decoder = codec.stream_decoder()
        self._decoding = _OverlappedDecoding(decoder) if overlap else _InlineDecoding(decoder)
        self._overlap = overlap
        self._prefix, self._prefix_out = prefix, prefix_out
        self._head = None  # the prefix's decode, until the first block is returned
        self.num_blocks = num_blocks
        self._ahead = None  # overlap: (block, latents, its decode) generated before the consumer asked

    @classmethod
    def start(cls, model: WanModel, codec: Codec, cfg: Config, cond: Conditioning, noise: CellNoise,
              num_blocks: int | None = None, on_cell=None, prefix_out: bool = True, overlap: bool = False) -> Stream:
        """A stream of `num_blocks` blocks (None: without end, in the wavefront schedule)."""
        runner = CellRunner(model, cond, cfg, noise, on_cell=on_cell)
        return cls(run_order(runner, num_blocks), codec, runner, cond.prefix, prefix_out, overlap, num_blocks)

    def switch(self, states: torch.Tensor, text: tuple[str, ...] = ()) -> int:
        """Use the prompt `states` [B, text_len, text_dim] from the next block not yet started; returns that block."""
        if self.runner is None:
            raise RuntimeError("this stream has no cell runner (a pipeline's last stage): it cannot switch prompts")
        block = self.runner.blocks_started
        if self.num_blocks is not None and block >= self.num_blocks:
            # step_major starts every block (its step 0) before the first comes out
            raise ValueError(f"every block of this stream has started ({self.num_blocks} blocks): a switch now "
                             "would change nothing; steer a live stream in the wavefront schedule or block-first")
        self.runner.cond.switch(block, states, text)
        return block

    def __iter__(self) -> Iterator[DecodedBlock]:
        return self

    def _generate(self):
        """The next block from the generation, its decode submitted; None at the end."""
        item = next(self._blocks, None)
        if item is None:
            return None
        n, x0 = item
        return n, x0, self._decoding.submit(x0)

    @torch.no_grad()
    def __next__(self) -> DecodedBlock:
        if self._prefix is not None:
            self._head, self._prefix = self._decoding.submit(self._prefix), None
        current, self._ahead = self._ahead or self._generate(), None
        if current is None:
            self._decoding.close()
            raise StopIteration
        if self._overlap:
            self._ahead = self._generate()  # block n + 1 is generated while block n decodes
        n, x0, decoding = current
        frames = self._decoding.result(decoding)
        if self._head is not None:
            head, self._head = self._decoding.result(self._head), None
            if self._prefix_out:
                frames = torch.cat([head.to(frames.dtype), frames], dim=1)
        return DecodedBlock(n, x0, frames)
