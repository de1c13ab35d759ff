import pytest
import torch

from hiar.config import load_config
from hiar.models import BlockCausal, BlockCausalWindow, Cached, CacheMissError, KVCache, StaticKVCache
from hiar.models.attention import attend, query_groups

from conftest import random_inputs, random_model


CACHES = [KVCache, StaticKVCache]


def rollout(model, window, x, t, text, k=3, cache_type=KVCache):
    """Block-by-block cached forwards: each block reads the cache, then writes itself into it."""
    cache = cache_type(model.config.num_layers, window)
    outs, held = [], []
    for start in range(0, x.shape[1], k):
        outs.append(model(x[:, start:start + k], t[:, start:start + k], text, Cached(cache, start, write_frames=k)))
        held.append(cache.frames())
    return torch.cat(outs, dim=1), held


@pytest.mark.parametrize("cache_type", CACHES)
def test_cached_rollout_equals_block_causal_forward(tiny, tiny_model, tiny_inputs, cache_type):
    x, t, text = tiny_inputs
    window = BlockCausalWindow.from_config(tiny.video)
    with torch.no_grad():
        full = tiny_model(x, t, text, BlockCausal(window))
        cached, _ = rollout(tiny_model, window, x, t, text, cache_type=cache_type)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_type", CACHES)
@pytest.mark.parametrize("window_frames,sink_frames", [(6, 0), (7, 1), (8, 2)])
def test_sliding_window_with_sink_equals_banded_mask(window_frames, sink_frames, cache_type):
    cfg = load_config("tiny", ["video.num_latent_frames=18", f"video.window_frames={window_frames}",
                               f"video.sink_frames={sink_frames}"])
    model = random_model(cfg)
    window = BlockCausalWindow.from_config(cfg.video)
    x, text = random_inputs(cfg, batch=1, seed=2)
    t = torch.linspace(1000, 100, 18)[None]
    with torch.no_grad():
        full = model(x, t, text, BlockCausal(window))
        cached, held = rollout(model, window, x, t, text, cache_type=cache_type)
        unbounded = model(x, t, text, BlockCausal(BlockCausalWindow(3)))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert (full[:, -3:] - unbounded[:, -3:]).abs().max() > 1e-3  # the window really cut context
    # memory stays within one window: the sink plus the frames the next block can still see
    assert max(len(h) for h in held) <= window_frames
    assert held[-1][:sink_frames] == list(range(sink_frames))


def test_window_rule_matches_the_published_semantics():
    # W = 21 with 3-frame blocks: a block sees the 18 frames before it, and itself.
    w = BlockCausalWindow(frames_per_block=3, window_frames=21)
    frames = torch.arange(40)
    row = w.frame_mask(torch.tensor([31]), frames)[0]  # frame 31 is in block [30, 33)
    assert frames[row].tolist() == list(range(12, 33))
    assert w.context_frames(30, 33) == list(range(12, 30))
    # with a sink of 3 frames the window keeps 0, 1, 2 and the 18 - 3 most recent
    w = BlockCausalWindow(frames_per_block=3, window_frames=21, sink_frames=3)
    row = w.frame_mask(torch.tensor([30]), frames)[0]
    assert frames[row].tolist() == [0, 1, 2] + list(range(15, 33))
    assert w.context_frames(30, 33) == [0, 1, 2] + list(range(15, 30))
    # unbounded: everything up to the end of the own block
    assert BlockCausalWindow(3).frame_mask(torch.tensor([4]), frames)[0].nonzero().flatten().tolist() == list(range(6))


@pytest.mark.parametrize("window_frames,sink_frames,start,frames", [(0, 0, 0, 12), (6, 0, 0, 18), (7, 1, 0, 18),
                                                                    (9, 0, 12, 6), (8, 2, 12, 6), (0, 0, 9, 3)])
def test_query_groups_equal_the_token_mask(window_frames, sink_frames, start, frames):
    """Attention run as one unmasked call per block equals SDPA under the expanded token mask: the
    full-sequence forward (start 0) and a cached call over context + two blocks (the fused forward)."""
    window, tokens = BlockCausalWindow(3, window_frames, sink_frames), 4
    query = torch.arange(start, start + frames)
    keys = torch.cat([torch.tensor(window.context_frames(start, start + frames), dtype=torch.long), query])
    frame_mask = window.frame_mask(query, keys)
    g = torch.Generator().manual_seed(window_frames + start)
    q = torch.randn(2, frames * tokens, 2, 8, generator=g)
    k, v = (torch.randn(2, len(keys) * tokens, 2, 8, generator=g) for _ in range(2))
    mask = frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    groups = query_groups(frame_mask, tokens, q.device)
    torch.testing.assert_close(attend(q, k, v, groups), expected, atol=1e-6, rtol=0)
    if bool(frame_mask.all()):
        assert groups is None  # one block: one plain call
    else:
        assert len(groups) == frames // 3  # one call per block
        assert any(not isinstance(seen, slice) for _, seen in groups) == (sink_frames > 0 and start + frames > window_frames)


@pytest.mark.parametrize("cache_type", CACHES)
def test_writing_a_block_twice_overwrites_it(tiny, tiny_model, tiny_inputs, cache_type):
    x, t, text = tiny_inputs
    window = BlockCausalWindow.from_config(tiny.video)
    with torch.no_grad():
        cache = cache_type(tiny.model.num_layers, window)
        tiny_model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
        tiny_model(x[:, :3], t[:, :3] * 0.5, text, Cached(cache, 0, write_frames=3))  # step-first rewrite
        rewritten = tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(cache, 3))
        fresh = cache_type(tiny.model.num_layers, window)
        tiny_model(x[:, :3], t[:, :3] * 0.5, text, Cached(fresh, 0, write_frames=3))
        expected = tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(fresh, 3))
    assert cache.frames() == [0, 1, 2]
    torch.testing.assert_close(rewritten, expected, atol=0, rtol=0)


def test_static_cache_equals_dict_cache_on_a_rewrite_behind_the_end(tiny, tiny_model, tiny_inputs):
    """Rewriting block 0 after block 1 (a read narrower than what is held, then a write in the middle):
    the static cache's slow path keeps the frames in order, as the dict does."""
    x, t, text = tiny_inputs
    window = BlockCausalWindow.from_config(tiny.video)
    outs = []
    for cache_type in (*CACHES, None):
        with torch.no_grad():
            cache = (cache_type or KVCache)(tiny.model.num_layers, window)
            tiny_model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
            tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(cache, 3, write_frames=3))
            if cache_type is not None:  # None: the same without the rewrite
                tiny_model(x[:, :3], t[:, :3] * 0.5, text, Cached(cache, 0, write_frames=3))
            outs.append(tiny_model(x[:, 6:9], t[:, 6:9], text, Cached(cache, 6)))
        assert cache.frames() == list(range(6))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    assert (outs[0] - outs[2]).abs().max() > 1e-3  # the rewrite was read


@pytest.mark.parametrize("cache_type", CACHES)
def test_reading_unwritten_context_is_an_error(tiny, tiny_model, tiny_inputs, cache_type):
    x, t, text = tiny_inputs
    cache = cache_type(tiny.model.num_layers, BlockCausalWindow.from_config(tiny.video))
    with torch.no_grad():
        with pytest.raises(CacheMissError, match=r"lacks context frames \[0, 1, 2\]"):
            tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(cache, 3))
        with pytest.raises(ValueError, match="block boundary"):
            tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(cache, 4))


def test_static_cache_refuses_forwards_with_grad(tiny, tiny_model, tiny_inputs):
    """Its in-place writes would corrupt what a pending backward saved: a forward with grad is refused
    at its start, before anything is written."""
    x, t, text = tiny_inputs
    cache = StaticKVCache(tiny.model.num_layers, BlockCausalWindow.from_config(tiny.video))
    with pytest.raises(RuntimeError, match="runtime.kv_cache=static .* torch.no_grad"):
        tiny_model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
    assert cache.frames() == [] and cache.nbytes() == 0


def test_a_call_spanning_two_blocks_equals_two_calls(tiny, tiny_model, tiny_inputs):
    """The fused pass of step-first inference: block n's cache write and block n+1's denoise in one
    forward, block n+1 seeing block n's fresh K/V, only block n stored."""
    x, t, text = tiny_inputs
    window = BlockCausalWindow.from_config(tiny.video)
    with torch.no_grad():
        fused_cache = KVCache(tiny.model.num_layers, window)
        tiny_model(x[:, :3], t[:, :3], text, Cached(fused_cache, 0, write_frames=3))
        fused = tiny_model(x[:, 3:9], t[:, 3:9], text, Cached(fused_cache, 3, write_frames=3))
        cache = KVCache(tiny.model.num_layers, window)
        tiny_model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
        first = tiny_model(x[:, 3:6], t[:, 3:6], text, Cached(cache, 3, write_frames=3))
        second = tiny_model(x[:, 6:9], t[:, 6:9], text, Cached(cache, 6))
    assert fused_cache.frames() == cache.frames() == list(range(6))
    torch.testing.assert_close(fused, torch.cat([first, second], dim=1), atol=1e-5, rtol=0)


def test_cache_rewrites_never_break_a_pending_backward(tiny, tiny_model, tiny_inputs):
    """Context is written without grad; a later rewrite of the same slot (the next step) must not
    invalidate tensors saved for a backward that is still pending (the reference's in-place cache
    does). The gradient is the same as without the rewrite."""
    x, t, text = tiny_inputs
    window = BlockCausalWindow.from_config(tiny.video)
    grads = []
    for rewrite in (False, True):
        cache = KVCache(tiny.model.num_layers, window)
        with torch.no_grad():
            tiny_model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
        block = x[:, 3:6].clone().requires_grad_(True)
        out = tiny_model(block, t[:, 3:6], text, Cached(cache, 3))
        if rewrite:
            with torch.no_grad():
                tiny_model(x[:, :3] + 1, t[:, :3], text, Cached(cache, 0, write_frames=3))
        out.square().mean().backward()
        grads.append(block.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
