import itertools

import pytest
import torch

from hiar.config import ConfigError, load_config
from hiar.models import Cached, KVCache, StaticKVCache
from hiar.sampling import CellNoise, CellRunner, SamplerStats, generate, run_order, sample_video

from hiar.models.wan import compile_blocks

from conftest import compile_unavailable, random_model, rollout_inputs as setup

S = 4  # denoising steps of every preset


@pytest.fixture(scope="module")
def model():
    return random_model(load_config("tiny"))


def run(model, *overrides, frames=18, stats=None):
    cfg, noise, text = setup(*overrides, frames=frames)
    with torch.no_grad():
        return sample_video(model, text, cfg, noise, frames // 3, stats)


@pytest.mark.parametrize("extra", [[], ["sampling.fused=true"], ["sampling.stepping=ode"],
                                   ["sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=2"],
                                   ["sampling.method=hybrid_steps", "sampling.frame_first_steps=2"],
                                   ["sampling.method=hybrid_steps", "sampling.frame_first_steps=1", "sampling.fused=true",
                                    "video.window_frames=7", "video.sink_frames=1"],
                                   ["video.window_frames=7", "video.sink_frames=1"]])
def test_step_major_equals_wavefront_bit_exactly(model, extra):
    a = run(model, "sampling.schedule=step_major", *extra)
    b = run(model, "sampling.schedule=wavefront", *extra)
    assert torch.equal(a, b)


def test_hybrid_ends_are_the_pure_orders(model):
    step_first = run(model, "sampling.method=timestep_first")
    frame_first = run(model, "sampling.method=frame_first")
    assert torch.equal(run(model, "sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=0"), step_first)
    assert torch.equal(run(model, "sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=6"), frame_first)
    assert (step_first - frame_first).abs().max() > 1e-2  # the order matters
    mixed = run(model, "sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=2")
    assert torch.equal(mixed[:, :6], frame_first[:, :6]) and not torch.equal(mixed[:, 6:], frame_first[:, 6:])


@pytest.mark.parametrize("schedule", ["step_major", "wavefront"])
@pytest.mark.parametrize("extra", [[], ["sampling.fused=true"], ["video.window_frames=7", "video.sink_frames=1"]])
def test_hybrid_steps_ends_are_the_pure_orders(model, schedule, extra):
    """K = 0 block-first steps is timestep_first and K = S is frame_first, bit for bit; K = 2 is neither.
    Block 0 has no context, so every K gives it the same cells."""
    run_k = lambda k: run(model, "sampling.method=hybrid_steps", f"sampling.frame_first_steps={k}",
                          f"sampling.schedule={schedule}", *extra)
    step_first = run(model, "sampling.method=timestep_first", f"sampling.schedule={schedule}", *extra)
    frame_first = run(model, "sampling.method=frame_first", *extra)
    assert torch.equal(run_k(0), step_first)
    assert torch.equal(run_k(S), frame_first)
    mixed = run_k(2)
    assert torch.equal(mixed[:, :3], step_first[:, :3]) and torch.equal(mixed[:, :3], frame_first[:, :3])
    for pure in (step_first, frame_first):
        assert (mixed[:, 3:] - pure[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [[], ["video.window_frames=7", "video.sink_frames=1"]])
@pytest.mark.parametrize("extra", [["sampling.method=frame_first"], ["sampling.method=frame_first", "sampling.fused=true"],
                                   ["sampling.schedule=step_major"], ["sampling.fused=true"],
                                   ["sampling.method=hybrid_block0", "sampling.num_frame_first_blocks=2"],
                                   ["sampling.method=hybrid_steps", "sampling.frame_first_steps=2"]])
def test_static_kv_cache_equals_the_dict_cache_bit_exactly(model, extra, window):
    static = run(model, "runtime.kv_cache=static", *extra, *window)
    assert torch.equal(static, run(model, *extra, *window))


@pytest.mark.parametrize("fused", [False, True])
def test_static_kv_cache_allocates_once_per_layer_with_a_window(model, monkeypatch, fused):
    """Windowed and unfused, every read of a 20-block rollout attends to a view of the one buffer its
    cache layer allocated at its first write (no concatenation, no growth); fused, the first 6-frame
    call grows it once."""
    storages: dict[tuple[int, int], set[int]] = {}
    with_context = StaticKVCache.with_context

    def spy(self, layer, context, k, v):
        keys, values = with_context(self, layer, context, k, v)
        storages.setdefault((id(self), layer), set()).add(keys.untyped_storage().data_ptr())
        return keys, values

    monkeypatch.setattr(StaticKVCache, "with_context", spy)
    cfg, noise, text = setup("runtime.kv_cache=static", "video.window_frames=7", "video.sink_frames=1",
                             f"sampling.fused={str(fused).lower()}", frames=60)
    with torch.no_grad():
        list(generate(model, text, cfg, noise, 20))
    assert len(storages) == S * model.config.num_layers
    assert all(len(ptrs) == (2 if fused else 1) for ptrs in storages.values())


def test_cells_with_grad_keep_the_dict_cache(model):
    """runtime.kv_cache=static serves sampling without grad; a runner whose cells may need grad
    (training's self-rollout) keeps the dict cache, which is never written in place."""
    cfg, noise, text = setup("runtime.kv_cache=static")
    assert isinstance(CellRunner(model, text, cfg, noise).new_context().kv, StaticKVCache)
    assert isinstance(CellRunner(model, text, cfg, noise, grad_cells=lambda n, j: True).new_context().kv, KVCache)


def test_compiled_blocks_equal_eager():
    """runtime.compile_blocks: the blocks' compiled halves give the eager video to float rounding
    (inductor fuses and reorders float32 arithmetic: 7e-7 seen on values of ~5; tolerance 1e-4). Two
    3-frame blocks: one graph a half, ~25 s cold on 2 busy CPU cores (fused 6-frame calls add two more)."""
    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    from torch._dynamo.utils import counters

    compiled = random_model(load_config("tiny"))  # compile_blocks changes the model: not the shared one
    eager = run(compiled, "sampling.stepping=ode", frames=6)
    graphs = counters["stats"]["unique_graphs"]
    out = run(compiled, "sampling.stepping=ode", "runtime.compile_blocks=true", frames=6)
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not silently eager
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)
    halves = [vars(block)["self_attention_input"] for block in compiled.blocks]
    compile_blocks(compiled)  # a second call (another runner) keeps the compiled halves
    assert [vars(block)["self_attention_input"] for block in compiled.blocks] == halves


def test_hybrid_steps_refuses_a_count_outside_the_steps(model):
    cfg, noise, text = setup("sampling.method=hybrid_steps", f"sampling.frame_first_steps={S + 1}")
    with pytest.raises(ConfigError, match=r"sampling.frame_first_steps=5 must lie in \[0, 4\]"):
        generate(model, text, cfg, noise, 6)


@pytest.mark.parametrize("method,fused,per_block,last", [("frame_first", False, S + 1, S),
                                                         ("timestep_first", False, 2 * S, S),
                                                         ("frame_first", True, S, S),
                                                         ("timestep_first", True, S, S),
                                                         ("hybrid_steps", False, 2 * S - 2 + 1, S),
                                                         ("hybrid_steps", True, S, S)])
def test_forwards_per_block(model, method, fused, per_block, last):
    """S + 1 = 5 forwards a block for frame_first and 2S = 8 for unfused timestep_first; the final
    block's cache writes are skipped (nobody reads them). Fused, a block's write rides in the next
    block's denoise forward: S a block. hybrid_steps with K = 2: K denoises and one write, then
    2 (S - K)."""
    stats = SamplerStats()
    run(model, f"sampling.method={method}", f"sampling.fused={str(fused).lower()}", "sampling.frame_first_steps=2",
        stats=stats)
    assert [stats.per_block[n] for n in range(6)] == [per_block] * 5 + [last]
    assert stats.forwards == sum(stats.per_block.values())


@pytest.mark.parametrize("method", ["frame_first", "timestep_first", "hybrid_block0", "hybrid_steps"])
def test_fused_equals_unfused(model, method):
    unfused = run(model, f"sampling.method={method}")
    fused = run(model, f"sampling.method={method}", "sampling.fused=true")
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)


class Spy:
    """Wraps the model. Records, for every denoised block, its first frame, its timestep and the
    levels at which each context frame it attends to was written (instrumented cache writes), and
    the caches' size after every forward."""

    def __init__(self, model):
        self.model, self.config, self.prompt = model, model.config, model.prompt
        self.levels: dict[int, dict[int, float]] = {}  # id(cache) -> frame -> level written
        self.cells: list[tuple[int, float, list[float]]] = []
        self.cache_bytes: list[int] = []

    def __call__(self, x, t, text, attention: Cached):
        f, start, w = x.shape[1], attention.start_frame, attention.write_frames
        per_frame = torch.as_tensor(t, dtype=torch.float64)
        per_frame = per_frame.reshape(-1)[:1].expand(f) if per_frame.ndim < 2 else per_frame[0]
        written = self.levels.setdefault(id(attention.cache), {})
        if f > w:  # denoises the frames after the ones it writes, which it sees too
            context = [written[frame] for frame in range(start)] + per_frame[:w].tolist()
            self.cells.append((start + w, float(per_frame[w]), context))
        for i in range(w):
            written[start + i] = float(per_frame[i])
        out = self.model(x, t, text, attention)
        self.cache_bytes.append(attention.cache.nbytes())
        return out


STEPS = [1000.0, 937.5, 2500 / 3, 625.0]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("level", ["next", "current", "clean"])
def test_context_level_each_cell_sees(model, level, fused):
    cfg, noise, text = setup(f"sampling.context_level={level}", f"sampling.fused={str(fused).lower()}")
    spy = Spy(model)
    with torch.no_grad():
        list(generate(spy, text, cfg, noise, 6))
    expect = {"next": STEPS[1:] + [0.0], "current": STEPS, "clean": [0.0] * 4}[level]
    assert len(spy.cells) == 6 * S
    for first, t, seen in spy.cells:
        j = STEPS.index(t)
        # block n at step j sees every earlier block, and all of it at the level step j promises
        assert len(seen) == first and all(abs(v - expect[j]) < 1e-9 for v in seen), (first, t, seen)


def test_frame_first_context_is_clean(model):
    cfg, noise, text = setup("sampling.method=frame_first")
    spy = Spy(model)
    with torch.no_grad():
        list(generate(spy, text, cfg, noise, 6))
    assert len(spy.cells) == 6 * S
    assert all(len(seen) == first and set(seen) <= {0.0} for first, _, seen in spy.cells)


@pytest.mark.parametrize("k,exit_step", [(1, S - 1), (2, S - 1), (3, S - 1), (S, S - 1), (3, 1), (2, 2)])
def test_hybrid_steps_context_each_cell_sees(model, k, exit_step):
    """The reference's inference_hybrid(frame_first_steps=K): block n's steps 0..K-1 see every earlier
    block at t_K, the level it hands on to step K (clean once the block is done: K = S); steps K..
    see it at t_{j+1}, as step-first. A rollout stopped at an exit step e < K leaves its context at
    t_{e+1}, not clean (the reference's early return)."""
    cfg, noise, text = setup("sampling.method=hybrid_steps", f"sampling.frame_first_steps={k}")
    spy = Spy(model)
    with torch.no_grad():
        list(run_order(CellRunner(spy, text, cfg, noise, exit_step=exit_step), 6))
    next_level = STEPS[1:] + [0.0]
    block_first_level = next_level[min(k - 1, exit_step)]
    assert len(spy.cells) == 6 * (exit_step + 1)
    for first, t, seen in spy.cells:
        j = STEPS.index(t)
        expect = block_first_level if j < k else next_level[j]
        assert len(seen) == first and all(abs(v - expect) < 1e-9 for v in seen), (k, first, t, seen)


def test_window_and_sink_rollout_memory_is_flat(model):
    """A rollout 10x the window keeps every cache at the size it reaches within one window."""
    peaks = []
    for blocks in (3, 24):  # 9 frames, then 72 frames: about 10 windows of 7
        cfg, noise, text = setup("video.window_frames=7", "video.sink_frames=1", frames=3 * blocks)
        spy = Spy(model)
        with torch.no_grad():
            for _ in generate(spy, text, cfg, noise, blocks):
                pass
        peaks.append(max(spy.cache_bytes))
    frame_bytes = 2 * 2 * model.config.num_layers * 4 * model.config.dim * 4  # K+V, batch 2, 4 tokens, fp32
    assert peaks[1] == peaks[0] <= 7 * frame_bytes


@pytest.mark.parametrize("fused", [False, True])
def test_cache_memory_is_the_frames_it_holds(model, fused):
    """A cache keeps alive the K/V of its frames and nothing more: a fused forward's write must not
    keep the denoised block's K/V alive too (it did: 2x cache memory, docs/benchmarks.md)."""
    cfg, noise, text = setup("sampling.schedule=step_major", f"sampling.fused={str(fused).lower()}")
    spy = Spy(model)
    with torch.no_grad():
        list(generate(spy, text, cfg, noise, 6))
    frame_bytes = 2 * 2 * model.config.num_layers * 4 * model.config.dim * 4  # K+V, batch 2, 4 tokens, fp32
    assert max(spy.cache_bytes) == 15 * frame_bytes  # blocks 0-4: nobody reads the last block's write


def test_unbounded_stream(model):
    cfg, noise, text = setup("sampling.schedule=wavefront", "video.window_frames=6")
    with torch.no_grad():
        blocks = list(itertools.islice(generate(model, text, cfg, noise, None), 8))
    assert [n for n, _ in blocks] == list(range(8))
    with pytest.raises(ValueError, match="wavefront"):
        next(generate(model, text, load_config("tiny", ["sampling.schedule=step_major"]), noise, None))


def test_cell_noise_is_a_pure_function_of_its_coordinates():
    a = CellNoise(3, [0, 1], (3, 2, 2, 2))
    b = CellNoise(3, [1], (3, 2, 2, 2))
    assert torch.equal(a.renoise(4, 2)[1], b.renoise(4, 2)[0])  # sample 1 is sample 1 in any batch
    b.initial(0), b.renoise(9, 1)  # drawing other cells first changes nothing
    assert torch.equal(a.initial(5), CellNoise(3, [0, 1], (3, 2, 2, 2)).initial(5))
    draws = [a.initial(0), a.initial(1), a.renoise(0, 0), a.renoise(0, 1), CellNoise(4, [0, 1], (3, 2, 2, 2)).initial(0)]
    assert all(not torch.equal(x, y) for x, y in itertools.combinations(draws, 2))


def test_batch_rows_are_independent_samples(model):
    cfg, _, text = setup()
    geo = cfg.geometry
    shape = (3, cfg.model.in_channels, geo.latent_height, geo.latent_width)
    with torch.no_grad():
        both = sample_video(model, text, cfg, CellNoise(7, [0, 1], shape), 6)
        second = sample_video(model, text[1:], cfg, CellNoise(7, [1], shape), 6)
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)


def test_ode_and_sde_stepping_differ_and_both_are_deterministic(model):
    sde, ode = run(model, "sampling.stepping=sde"), run(model, "sampling.stepping=ode")
    assert torch.equal(ode, run(model, "sampling.stepping=ode"))
    assert (sde - ode).abs().max() > 1e-3


def test_prompt_key_values_are_computed_once_per_generation(model):
    """The prompt's cross-attention K/V are projected once, then reused by every forward."""
    calls = []
    hooks = [b.attn2.to_k.register_forward_hook(lambda *a: calls.append(1)) for b in model.blocks]
    stats = SamplerStats()
    try:
        run(model, stats=stats)
    finally:
        for h in hooks:
            h.remove()
    assert stats.forwards > 40 and len(calls) == model.config.num_layers
