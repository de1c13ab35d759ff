"""The (block n, step j) cell and the orders that schedule it (docs/design.md, section 1).

A cell denoises block n at step j:
1. x0 = denoise(x_n at t_j | context of the blocks before n)     one forward
2. x_n <- advance(x0 to t_{j+1}) for j < S - 1, else x0 is the block's output
3. the block's context for later blocks, advance(x0 to the context level), is written into a
   KV cache by one more forward of it.

Orders differ only in which cache a cell reads and writes, and at what level:
* frame_first (Self-Forcing): one cache; each block runs its S cells, then writes its clean output.
* timestep_first (HiAR): one cache per step; cell (n, j) reads cache j, where every earlier block
  sits at t_{j+1}, the level this step produces, and writes itself there at t_{j+1} (the very tensor it
  takes as input at step j + 1).
* hybrid_block0: the first K blocks frame-first, then their clean context seeds every step's cache.
* hybrid_steps: the first K steps of every block block-first, against one cache where earlier blocks
  sit at t_K (the level those steps produce), then steps K.. step-first (K = 0: timestep_first;
  K = S: frame_first).

Step 3 is deferred: a cache write waits in its cache until the next read of that cache, which is
always the next block at the same step. It is then run as its own forward or, with `fused`, in one
forward together with that read (paper, section 3.2). A write nobody reads (the last block's) is
never run. Cells on an anti-diagonal are independent, so the step-first cells can run step by step
(`step_major`) or diagonal by diagonal (`wavefront`: S live caches, blocks stream out); both execute
identical forwards on identical tensors, so they give bit-identical videos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hiar.config import Config, ConfigError
from hiar.flow import FlowMatching
from hiar.fp8 import fp8_linears
from hiar.conditioning import Conditioning
from hiar.models import BlockCausalWindow, Cached, KVCache, StaticKVCache, WanModel
from hiar.models.wan import Prompt
from hiar.models.wan import compile_blocks

# -- deterministic noise ------------------------------------------------------------------------


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from `parts`, the same in every process and run (Python's hash() of a str is
    salted per process): the key of every seed HiAR derives from (seed, ...) tuples."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class CellNoise:
    """Gaussian noise as a pure function of (seed, sample index, block, step).

    `initial(n)` is block n's starting noise at t_0; `renoise(n, j)` is the fresh noise of cell
    (n, j). Each is drawn on the CPU from its own generator, so any order of cells, any process
    layout and any device see the same numbers. Returns [B, k, C, h, w], one row per sample.
    """

    def __init__(self, seed: int, samples: Sequence[int], block_shape: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.seed = seed
        self.samples = list(samples)
        self.block_shape = tuple(block_shape)
        self.device, self.dtype = torch.device(device), dtype

    def _draw(self, block: int, step: int) -> torch.Tensor:
        rows = []
        for sample in self.samples:
            g = torch.Generator().manual_seed(stable_hash(self.seed, sample, block, step) & (2**63 - 1))
            rows.append(torch.randn(self.block_shape, generator=g))
        return torch.stack(rows).to(self.device, self.dtype)

    def initial(self, block: int) -> torch.Tensor:
        return self._draw(block, -1)

    def renoise(self, block: int, step: int) -> torch.Tensor:
        return self._draw(block, step)


def block_noise(cfg: Config, seed: int, samples: Sequence[int], device: torch.device | str = "cpu") -> CellNoise:
    """The cell noise of a generation with this config's latent geometry."""
    geo = cfg.geometry
    shape = (cfg.video.frames_per_block, cfg.model.in_channels, geo.latent_height, geo.latent_width)
    return CellNoise(seed, samples, shape, device)


# -- the cell -------------------------------------------------------------------------------------


@dataclass
class SamplerStats:
    """Model forwards of one generation. A fused forward counts once, for the block it denoises; a
    cache write that no later block reads (the final block's) is skipped and not counted."""

    forwards: int = 0
    frames: int = 0  # latent frames through the model, summed over forwards
    per_block: Counter = field(default_factory=Counter)


@dataclass
class _Write:
    block: int  # -1: the conditioning's prefix
    x: torch.Tensor  # the block's context input [B, k, C, h, w] (the prefix: [B, P, C, h, w])
    t: float  # its level


class Context:
    """One KV cache, the write that waits for its next read and, for re-caching after a prompt switch,
    the writes whose frames the cache still holds and the prompt segment they were written under."""

    def __init__(self, kv: KVCache | StaticKVCache):
        self.kv = kv
        self.pending: _Write | None = None
        self.kept: list[_Write] = []
        self.segment = 0

    def copy(self) -> Context:
        assert self.pending is None, "flush a context before copying it"
        twin = Context(self.kv.copy())
        twin.kept, twin.segment = list(self.kept), self.segment
        return twin


class CellRunner:
    """Runs cells of one batch of prompts: the denoise forward, the step, the deferred cache write.

    What each block is conditioned on (its prompt, clean prefix frames) is a `Conditioning`
    (hiar/conditioning.py); a bare prompt-states tensor is one prompt for every block. Cross-attention
    K/V are computed once per prompt, when a block first needs it.

    Training's self-rollout uses the same runner with two settings: `exit_step` e (the orders stop
    after step e and yield its x0 predictions) and `grad_cells(block, step)`, which says which cells
    run with autograd on (the exit step's cells in the gradient window). Cache writes always run
    without grad, so the K/V a block leaves for later blocks never carry gradient (the reference
    leaks gradient through its in-place cache).
    """

    def __init__(self, model: WanModel, cond: torch.Tensor | Conditioning, cfg: Config, noise: CellNoise,
                 stats: SamplerStats | None = None, on_cell: Callable[[], None] | None = None,
                 exit_step: int | None = None, grad_cells: Callable[[int, int], bool] | None = None):
        self.model, self.noise, self.on_cell, self.grad_cells = model, noise, on_cell, grad_cells
        self.cond = Conditioning.of(cond)
        self._prompts: dict[int, Prompt] = {}  # cross-attention K/V by prompt segment
        self.blocks_started = 0  # blocks that ran their first cell: a live switch applies from here
        self.options = cfg.sampling
        self.flow = FlowMatching(cfg.schedule.shift)
        self.timesteps = cfg.schedule.timesteps
        self.exit_step = self.num_steps - 1 if exit_step is None else exit_step
        if not 0 <= self.exit_step < self.num_steps:
            raise ValueError(f"exit_step={exit_step} must lie in [0, {self.num_steps - 1}]")
        if not 0 <= self.options.frame_first_steps <= self.num_steps:
            raise ConfigError(f"sampling.frame_first_steps={self.options.frame_first_steps} must lie in "
                              f"[0, {self.num_steps}] (the denoising steps)")
        self.k = cfg.video.frames_per_block
        self.window = BlockCausalWindow.from_config(cfg.video, self.cond.prefix_frames)
        self.stats = stats if stats is not None else SamplerStats()
        # A static cache is written in place, which a cell with grad could not backpropagate through.
        self.cache_type = StaticKVCache if cfg.runtime.kv_cache == "static" and grad_cells is None else KVCache
        if grad_cells is None:  # sampling only: fp8 rounds the weights in place, which training must not
            if cfg.runtime.fp8_linear == "torchao" and not cfg.runtime.compile_blocks:
                warnings.warn("runtime.fp8_linear=torchao without runtime.compile_blocks: its casts and scales "
                              "run as separate kernels, 3-4x slower than bf16 on an H200 (docs/benchmarks.md)",
                              stacklevel=2)
            fp8_linears(model, cfg.runtime.fp8_linear)  # before compiling: the compiled halves call them
        if cfg.runtime.compile_blocks:
            compile_blocks(model)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def new_context(self) -> Context:
        """An empty cache, holding the conditioning's prefix (clean, t = 0) when there is one."""
        ctx = Context(self.new_cache())
        if self.cond.prefix is not None:
            self.write(ctx, _Write(-1, self.cond.prefix.to(self.noise.device, self.noise.dtype), 0.0), segment=0)
        return ctx

    def new_cache(self, floor: int = 0) -> KVCache | StaticKVCache:
        """An empty cache of this runner's window; no frame before `floor` is context (`recache`)."""
        return self.cache_type(self.model.config.num_layers, dataclasses.replace(self.window, floor=floor))

    def prompt(self, segment: int) -> Prompt:
        """Cross-attention K/V of a prompt segment, computed on first use (with grad when cells need it)."""
        if segment not in self._prompts:
            with torch.set_grad_enabled(self.grad_cells is not None):
                self._prompts[segment] = self.model.prompt(self.cond.segments[segment].states)
        return self._prompts[segment]

    def start_frame(self, block: int) -> int:
        return 0 if block < 0 else self.cond.prefix_frames + block * self.k

    def context_level(self, step: int) -> float:
        """The level at which step-first writes a block's context at `step`."""
        level = self.options.context_level
        if level == "clean":
            return 0.0
        if level == "current":
            return self.timesteps[step]
        return self.timesteps[step + 1] if step + 1 < self.num_steps else 0.0

    def _forward(self, x: torch.Tensor, t: torch.Tensor | float, ctx: Context, block: int, start_frame: int,
                 write_frames: int, segment: int) -> torch.Tensor:
        self.stats.forwards += 1
        self.stats.frames += x.shape[1]
        self.stats.per_block[block] += 1
        return self.model(x, t, self.prompt(segment), Cached(ctx.kv, start_frame, write_frames))

    def write(self, ctx: Context, w: _Write, segment: int) -> None:
        """Store `w`'s K/V in `ctx` under prompt `segment` (never with grad: see the class docstring)."""
        with torch.no_grad():
            self._forward(w.x, w.t, ctx, w.block, self.start_frame(w.block), w.x.shape[1], segment)
        self._keep(ctx, w)

    def _keep(self, ctx: Context, w: _Write) -> None:
        """Remember the writes whose frames the cache still holds: what a re-cache replays."""
        if self.options.switch == "recache":
            held = set(ctx.kv.frames())
            ctx.kept = [kept for kept in [*ctx.kept, w] if self.start_frame(kept.block) in held]

    def flush(self, ctx: Context) -> None:
        """Run the pending cache write of `ctx` on its own, under its block's prompt."""
        if ctx.pending is not None:
            w, ctx.pending = ctx.pending, None
            self.write(ctx, w, self.cond.segment_of(w.block))

    def recache(self, ctx: Context, segment: int) -> None:
        """Rebuild `ctx` under prompt `segment`: a fresh cache into which every write it holds (and the
        pending one) is replayed in order, at the level it was written at."""
        writes = [*ctx.kept, *([ctx.pending] if ctx.pending is not None else [])]
        # The frames the window had evicted stay out: the oldest replayed block past the sink sees the sink
        # and the rebuilt frames only, as a window re-run under the new prompt would (LongLive's re-cache).
        floor = min((f for f in map(self.start_frame, (w.block for w in writes)) if f >= self.window.sink_frames),
                    default=0)
        ctx.kv, ctx.pending, ctx.kept, ctx.segment = self.new_cache(floor), None, [], segment
        for w in writes:
            self.write(ctx, w, segment)

    def denoise(self, ctx: Context, block: int, step: int, x: torch.Tensor) -> torch.Tensor:
        """x0 prediction of block `block` at `step`, reading `ctx` (and running its pending write)."""
        segment = self.cond.segment_of(block)
        if self.options.switch == "recache" and ctx.segment != segment:
            self.recache(ctx, segment)  # the first block of a new prompt reads this cache
        t, k, w = self.timesteps[step], self.k, ctx.pending
        # A fused forward would compute the write's K/V with grad on, so cells with grad run unfused.
        if (self.options.fused and w is not None and w.block == block - 1 and not torch.is_grad_enabled()
                and self.cond.segment_of(w.block) == segment):
            # [context of block n at its level | block n+1 at t_j]: n+1 sees n's fresh K/V, n is stored.
            # Both halves take block n+1's prompt, so a fused write of a block whose prompt differs
            # (the last block before a switch) runs on its own instead.
            ctx.pending = None
            levels = torch.tensor([w.t] * k + [t] * k, dtype=torch.float64).expand(x.shape[0], -1)
            flow = self._forward(torch.cat([w.x, x], dim=1), levels, ctx, block, self.start_frame(w.block), k,
                                 segment)[:, k:]
            self._keep(ctx, w)
        else:
            self.flush(ctx)
            flow = self._forward(x, t, ctx, block, self.start_frame(block), 0, segment)
        return self.flow.x0_from_flow(x, flow, t)

    def advance(self, x: torch.Tensor, x0: torch.Tensor, block: int, step: int, t_to: float) -> torch.Tensor:
        """Take block `block` from t_step (input x, prediction x0) to level t_to."""
        if self.options.stepping == "ode":
            return self.flow.ode_step(x, x0, self.timesteps[step], t_to)
        return self.flow.sde_step(x0, self.noise.renoise(block, step), t_to)

    def cell(self, ctx: Context, block: int, step: int, x: torch.Tensor,
             context_t: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One cell: returns (x0, the block's input for the next step, or x0 after the last step).
        With `context_t`, the block's context at that level waits in `ctx` for the next read."""
        self.blocks_started = max(self.blocks_started, block + 1)
        grad = (contextlib.nullcontext() if self.grad_cells is None
                else torch.set_grad_enabled(self.grad_cells(block, step)))
        with grad:
            x0 = self.denoise(ctx, block, step, x)
            last = step == self.num_steps - 1
            x_next = x0 if last else self.advance(x, x0, block, step, self.timesteps[step + 1])
        if context_t is not None:
            reuse = not last and context_t == self.timesteps[step + 1]  # the same tensor, same noise draw
            write = x_next if reuse else self.advance(x, x0, block, step, context_t)
            ctx.pending = _Write(block, write.detach(), context_t)
        if self.on_cell is not None:
            self.on_cell()
        return x0, x_next


# -- orders -----------------------------------------------------------------------------------------

Blocks = Iterator[tuple[int, torch.Tensor]]  # (block index, clean latents [B, k, C, h, w]) as they finish


def block_first(runner: CellRunner, ctx: Context, blocks: Iterable[int], last: int,
                context_t: float) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each block runs steps 0..`last` against `ctx`, then leaves its context there at `context_t`.
    Yields (block, x0 of step `last`, the block's input to step `last` + 1) as blocks finish."""
    for n in blocks:
        x = runner.noise.initial(n)
        for j in range(last + 1):
            x0, x = runner.cell(ctx, n, j, x, context_t if j == last else None)
        yield n, x0, x


def frame_first(runner: CellRunner, ctx: Context, blocks: Iterable[int]) -> Blocks:
    """Block-first: each block runs its steps (to the exit step) against the clean context of the
    blocks before it, then leaves its output as context."""
    for n, x0, _ in block_first(runner, ctx, blocks, runner.exit_step, runner.options.frame_first_context_t):
        yield n, x0


def timestep_first(runner: CellRunner, contexts: Mapping[int, Context], starts: Iterable[tuple[int, torch.Tensor]],
                   schedule: str, first_step: int = 0) -> Blocks:
    """Step-first from `first_step`: cell (n, j) reads contexts[j], where earlier blocks sit at the level
    of step j's output. `starts` gives (block, its input to `first_step`) in block order; it is drawn
    lazily, one block a pass, by the wavefront."""
    if schedule == "step_major":
        xs = dict(starts)
        x0s = {}
        for j in range(first_step, runner.exit_step + 1):
            for n in xs:
                x0s[n], xs[n] = runner.cell(contexts[j], n, j, xs[n], runner.context_level(j))
        yield from x0s.items()
        return
    # Wavefront: each pass admits one new block and advances every live block by one step, oldest
    # first, so every cell finds its two inputs, (n, j-1) and (m < n, j), done on the pass before.
    live: dict[int, tuple[int, torch.Tensor]] = {}
    source = iter(starts)
    while True:
        start = next(source, None)
        if start is not None:
            n_new, x_new = start
            live[n_new] = (first_step, x_new)
        if not live:
            return
        for n in list(live):
            j, x = live[n]
            x0, x = runner.cell(contexts[j], n, j, x, runner.context_level(j))
            if j == runner.exit_step:
                del live[n]
                yield n, x0
            else:
                live[n] = (j + 1, x)


# What a step_major sweep may hold up front (every block's input and x0 prediction): beyond it, the
# wavefront schedule gives the same video with flat memory. 4 GiB is ~1,800 blocks of 480x832 Wan latents, one sample.
STEP_MAJOR_MAX_BYTES = 4 * 2**30


def step_major_bytes(block_shape: Sequence[int], batch: int, num_blocks: int) -> int:
    """Bytes a step_major sweep of `num_blocks` blocks holds at once: two float32 tensors a block."""
    return 2 * 4 * batch * num_blocks * math.prod(block_shape)


def check_step_major(schedule: str, method: str, block_shape: Sequence[int], batch: int, num_blocks: int) -> None:
    """Refuse, before any compute, a step_major sweep whose up-front latents exceed STEP_MAJOR_MAX_BYTES."""
    if schedule != "step_major" or method == "frame_first":
        return
    need = step_major_bytes(block_shape, batch, num_blocks)
    if need > STEP_MAJOR_MAX_BYTES:
        raise ValueError(f"sampling.schedule=step_major would hold {_size(need)} of latents up front for "
                         f"{num_blocks} blocks x {batch} samples (at most {_size(STEP_MAJOR_MAX_BYTES)}): use "
                         "sampling.schedule=wavefront (--schedule wavefront), the same video streamed in flat memory")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def generate(model: WanModel, cond: torch.Tensor | Conditioning, cfg: Config, noise: CellNoise, num_blocks: int | None,
             stats: SamplerStats | None = None, on_cell: Callable[[], None] | None = None) -> Blocks:
    """Blocks of one batch of prompts (`cond`: prompt states, or a `Conditioning`) in the configured
    order, yielded as they finish.

    `num_blocks=None` streams forever (frame_first, or a wavefront schedule). `on_cell` is called
    after every cell (progress bars).
    """
    return run_order(CellRunner(model, cond, cfg, noise, stats, on_cell), num_blocks)


def run_order(runner: CellRunner, num_blocks: int | None) -> Blocks:
    """`generate` for a runner already built (training's self-rollout builds its own)."""
    opts = runner.options
    if num_blocks is None and opts.schedule == "step_major" and opts.method != "frame_first":
        raise ValueError("an unbounded stream needs the wavefront schedule (sampling.schedule=wavefront)")
    if num_blocks is not None:
        check_step_major(opts.schedule, opts.method, runner.noise.block_shape, len(runner.noise.samples), num_blocks)
    runner.cond.check_blocks(num_blocks)
    blocks = range(num_blocks) if num_blocks is not None else itertools.count()
    if opts.method == "hybrid_steps":
        yield from hybrid_steps(runner, blocks, opts.schedule)
        return
    first = runner.new_context()
    if opts.method == "frame_first":
        yield from frame_first(runner, first, blocks)
        return
    num_ff = opts.num_frame_first_blocks if opts.method == "hybrid_block0" else 0
    if num_blocks is not None:
        num_ff = min(num_ff, num_blocks)
    yield from frame_first(runner, first, itertools.islice(blocks, num_ff))
    runner.flush(first)
    # The frame-first blocks' clean context is the same in every step's cache: share it, no recompute.
    contexts = {j: first.copy() for j in range(runner.num_steps)}
    rest = range(num_ff, num_blocks) if num_blocks is not None else itertools.count(num_ff)
    yield from timestep_first(runner, contexts, ((n, runner.noise.initial(n)) for n in rest), opts.schedule)


def hybrid_steps(runner: CellRunner, blocks: Iterable[int], schedule: str) -> Blocks:
    """The first K = sampling.frame_first_steps steps of every block block-first, the rest step-first
    (the reference's `inference_hybrid(frame_first_steps=K)`, docs/design.md, section 1).

    Steps 0..K-1 of block n read one cache where every earlier block sits at the context level of step
    K-1 (t_K with context_level=next: the very tensor it takes into step K). After K = S steps the
    block is done and leaves its context at frame_first_context_t, as frame_first; a rollout whose exit
    step e comes first leaves it at step e's level (the reference's early return). Steps K.. then run
    step-first with a fresh cache per step, as timestep_first from step K. Cell (n, K) needs only
    (n, K-1) and (m < n, K), so the wavefront can run each block's block-first part just before
    admitting it: both schedules give the same video.
    """
    exit_step, k = runner.exit_step, runner.options.frame_first_steps
    if k == 0:
        starts: Iterable[tuple[int, torch.Tensor]] = ((n, runner.noise.initial(n)) for n in blocks)
    else:
        last = min(k - 1, exit_step)
        done = last == runner.num_steps - 1
        context_t = runner.options.frame_first_context_t if done else runner.context_level(last)
        cells = block_first(runner, runner.new_context(), blocks, last, context_t)
        if last == exit_step:
            yield from ((n, x0) for n, x0, _ in cells)
            return
        starts = ((n, x) for n, _, x in cells)
    contexts = {j: runner.new_context() for j in range(k, exit_step + 1)}
    yield from timestep_first(runner, contexts, starts, schedule, first_step=k)


def sample_video(model: WanModel, cond: torch.Tensor | Conditioning, cfg: Config, noise: CellNoise, num_blocks: int,
                 stats: SamplerStats | None = None) -> torch.Tensor:
    """The whole clean latent video [B, num_blocks * k, C, h, w] (without the conditioning's prefix)."""
    blocks = dict(generate(model, cond, cfg, noise, num_blocks, stats))
    return torch.cat([blocks[n] for n in range(num_blocks)], dim=1)


# -- the bidirectional teacher ----------------------------------------------------------------------


def guided(model: WanModel, text: torch.Tensor, negative: torch.Tensor, scale: float) -> Callable:
    """Classifier-free guidance as a denoiser: (x, t) -> v_neg + scale * (v_text - v_neg), one batched forward."""
    prompts = model.prompt(torch.cat([text, negative.expand_as(text)]))

    def flow(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t  # per-sample timesteps for both halves
        v_text, v_neg = model(torch.cat([x, x]), t, prompts).chunk(2)
        return v_neg + scale * (v_text - v_neg)

    return flow


@torch.no_grad()
def teacher_ode(denoiser: Callable, timesteps: torch.Tensor, noise: torch.Tensor, flow: FlowMatching,
                keep: Sequence[int] = (), context: tuple[torch.Tensor, float] | None = None,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Euler steps of the probability-flow ODE over `timesteps` (t_0 > ... > t_N = 0) from `noise`
    [B, F, C, h, w], all frames at once. Returns the clean latents and {i: x at t_i} for i in `keep`.
    `context` (latents [B, c, C, h, w] at timestep t_c, t_c): the first c frames are given, held at t_c at
    every step (the denoiser sees a timestep per frame) while the ODE draws the others; the returned clean
    latents start with the denoiser's x0 of them."""
    x, points = noise, {}
    given, t_c = context if context is not None else (noise[:, :0], 0.0)
    c = given.shape[1]
    for i, (t, t_next) in enumerate(zip(timesteps[:-1].tolist(), timesteps[1:].tolist())):
        if c:
            x = torch.cat([given, x[:, c:]], 1)
            t = torch.full(x.shape[:2], t, device=x.device)
            t[:, :c] = t_c
        if i in keep:
            points[i] = x
        x0 = flow.x0_from_flow(x, denoiser(x, t), t)
        x = flow.ode_step(x, x0, t, t_next) if t_next > 0 else x0  # given frames: replaced at the next step
    return x, points
