"""Activation checkpointing with the KV cache: a block recomputed in backward must see exactly the K/V
its original forward saw, even after the rollout has moved on and the cache has evicted or rewritten
that context, and the recompute must not write the cache again."""

import copy
import weakref

import pytest
import torch

from conftest import random_model
from hiar.config import load_config
from hiar.distill import self_rollout
from hiar.models import BlockCausalWindow, Cached, KVCache
from hiar.sampling import block_noise
from hiar.training import enable_activation_checkpointing


def rollout_gradients(model, cfg, text, noise, weights, exit):
    """Parameter gradients of sum(weights * self_rollout(...)), and the rollout itself."""
    model.zero_grad()
    x = self_rollout(model, text, cfg, noise, exit=exit, grad=True)
    (x * weights).sum().backward()
    return x.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["timestep_first", "frame_first"])
@pytest.mark.parametrize("exit", [1, 3])
def test_checkpointed_rollout_longer_than_the_window_has_the_same_gradients(method, exit):
    """A 12-frame rollout with a 9-frame window and a 9-frame gradient window: by backward, the cache
    has evicted frames 0-2 that the first gradient block (frames 3-5) read. Its recompute used to
    raise CacheMissError; now it reads the K/V its forward read, so the gradients are the plain ones."""
    cfg = load_config("tiny", [f"sampling.method={method}", "video.window_frames=9", "distill.num_rollout_frames=12",
                               "distill.num_training_frames=9", "distill.rollout_length=max",
                               "distill.window_start=slice"])  # every rollout 4 blocks, block 1 with grad
    plain = random_model(cfg)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    text = torch.randn(2, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(0))
    noise = block_noise(cfg, 0, [0, 1])
    weights = torch.randn(2, 9, cfg.model.out_channels, 4, 4, generator=torch.Generator().manual_seed(1))

    x_plain, g_plain = rollout_gradients(plain, cfg, text, noise, weights, exit)
    x_ckpt, g_ckpt = rollout_gradients(checkpointed, cfg, text, noise, weights, exit)
    torch.testing.assert_close(x_ckpt, x_plain, rtol=0, atol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for n, g in g_plain.items():
        assert g.abs().max() > 0, n  # every parameter gets gradient, so the comparison means something
        torch.testing.assert_close(g_ckpt[n], g, rtol=0, atol=1e-6 * float(g.abs().max()), msg=n)


def cached_block_gradients(model, cfg, x, t, text, rewrite):
    """Gradient of a cached forward of frames 3-5 (reading frames 0-2) in x and the parameters; with
    `rewrite`, frames 0-2 of the cache are rewritten with other K/V between forward and backward (as
    the step-first order's next step does to a cache it reads)."""
    cache = KVCache(cfg.model.num_layers, BlockCausalWindow.from_config(cfg.video))
    with torch.no_grad():
        model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
    model.zero_grad()
    block = x[:, 3:6].clone().requires_grad_(True)
    out = model(block, t[:, 3:6], text, Cached(cache, 3))
    if rewrite:
        with torch.no_grad():
            model(x[:, :3] + 1, t[:, :3], text, Cached(cache, 0, write_frames=3))
    out.square().mean().backward()
    return [block.grad, *(p.grad.clone() for p in model.parameters())]


def test_a_recompute_reads_the_context_of_its_forward_not_the_rewritten_cache(tiny, tiny_inputs):
    """Where the cache still holds the context frames but with other K/V, a recompute used to read the
    new ones silently (wrong gradients, no error)."""
    x, t, text = tiny_inputs
    plain = random_model(tiny)
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    expected = cached_block_gradients(plain, tiny, x, t, text, rewrite=False)
    for model in (plain, checkpointed):
        for got, want in zip(cached_block_gradients(model, tiny, x, t, text, rewrite=True), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_a_recompute_never_writes_the_cache(tiny, tiny_inputs):
    """A cached forward that writes (here even with grad on) writes each layer once: its recompute in
    backward must not store its K/V again (it would replace, with stale K/V, what later blocks wrote)."""
    x, t, text = tiny_inputs
    model = random_model(tiny)
    enable_activation_checkpointing(model)
    cache = KVCache(tiny.model.num_layers, BlockCausalWindow.from_config(tiny.video))
    with torch.no_grad():
        model(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
    writes = []
    write = cache.write
    cache.write = lambda *args: (writes.append(args[0]), write(*args))
    out = model(x[:, 3:6].clone().requires_grad_(True), t[:, 3:6], text, Cached(cache, 3, write_frames=3))
    stored = [cache.entries(layer, [3, 4, 5]) for layer in range(tiny.model.num_layers)]
    assert writes == list(range(tiny.model.num_layers))
    out.square().mean().backward()
    assert writes == list(range(tiny.model.num_layers))  # the recompute wrote nothing
    after = [cache.entries(layer, [3, 4, 5]) for layer in range(tiny.model.num_layers)]
    assert all(a is b for layer, later in zip(stored, after) for kv, kv_later in zip(layer, later)
               for a, b in zip(kv, kv_later))


def test_a_forward_without_grad_keeps_no_evicted_frame_alive(tiny, tiny_model, tiny_inputs):
    """Inference has no backward, so the context snapshot must not keep a frame that the forward's own
    write evicted alive until the forward ends: each layer lets its snapshot go once it has run."""
    x, t, text = tiny_inputs
    cache = KVCache(tiny.model.num_layers, BlockCausalWindow(3, window_frames=6))
    alive_at_layer_1 = []
    with torch.no_grad():
        for start in (0, 3):
            tiny_model(x[:, start:start + 3], t[:, start:start + 3], text, Cached(cache, start, write_frames=3))
        frame_3 = weakref.ref(cache.entries(0, [3])[0][0])  # layer 0's K of frame 3: read, then evicted
        hook = tiny_model.blocks[1].register_forward_pre_hook(lambda *_: alive_at_layer_1.append(frame_3() is not None))
        tiny_model(x[:, 6:9], t[:, 6:9], text, Cached(cache, 6, write_frames=3))
        hook.remove()
    assert cache.frames(0) == [6, 7, 8] and alive_at_layer_1 == [False]
