import pytest
import torch
from diffusers import WanTransformer3DModel

from hiar.config import load_config
from hiar.models import Bidirectional, BlockCausal, BlockCausalWindow, Cached, KVCache, WanModel
from hiar.models.attention import (SDPA_KERNELS, AttentionBackendError, RotaryEmbedding, apply_rope,
                                   check_attention_backend)
from hiar.models.wan import diffusers_transformer_config

from conftest import random_model


def diffusers_twin(cfg, model: WanModel) -> WanTransformer3DModel:
    ref = WanTransformer3DModel(**diffusers_transformer_config(cfg.model)).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def test_bidirectional_forward_equals_diffusers(tiny, tiny_model, tiny_inputs):
    x, t, text = tiny_inputs
    ref = diffusers_twin(tiny, tiny_model)
    # diffusers' state dict loads into ours with no key left over either way
    assert tiny_model.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        per_sample = torch.tensor([937.5, 250.0])
        ours = tiny_model(x, per_sample, text)
        theirs = ref(x.transpose(1, 2), per_sample, text).sample.transpose(1, 2)
        assert ours.abs().mean() > 0.1
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        # Per-frame timesteps: diffusers takes one timestep per token.
        tokens = tiny.geometry.tokens_per_frame
        ours = tiny_model(x, t, text)
        theirs = ref(x.transpose(1, 2), t.repeat_interleave(tokens, dim=1), text).sample.transpose(1, 2)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset,low,high", [("tiny", 0, None), ("toy", 0, None), ("wan1.3b", 1.3e9, 1.5e9),
                                             ("wan14b", 13.5e9, 14.5e9)])
def test_parameter_count_equals_diffusers(preset, low, high):
    cfg = load_config(preset)
    with torch.device("meta"):  # nothing is allocated, even for 14B
        ours = sum(p.numel() for p in WanModel(cfg.model).parameters())
        theirs = sum(p.numel() for p in WanTransformer3DModel(**diffusers_transformer_config(cfg.model)).parameters())
    assert ours == theirs
    assert ours > low and (high is None or ours < high)


def test_per_sample_timesteps_equal_separate_forwards(tiny_model, tiny_inputs):
    x, _, text = tiny_inputs
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        both = tiny_model(x, t, text)
        for i in range(2):
            torch.testing.assert_close(both[i:i + 1], tiny_model(x[i:i + 1], t[i:i + 1], text[i:i + 1]),
                                       atol=1e-5, rtol=0)
        # a per-frame tensor that is constant within each sample is the per-sample case
        torch.testing.assert_close(tiny_model(x, t[:, None].expand(2, x.shape[1]), text), both)


def test_mixed_timesteps_in_a_block_causal_forward(tiny, tiny_model, tiny_inputs):
    """Under the block-causal mask, block 0 sees only itself: its output at mixed per-frame timesteps
    equals a forward of block 0 alone. Later blocks see the earlier ones at *their* timesteps, which
    is exactly what a cache written block by block gives (step-first context at t_{j+1})."""
    x, t, text = tiny_inputs
    mode = BlockCausal(BlockCausalWindow.from_config(tiny.video))
    with torch.no_grad():
        full = tiny_model(x, t, text, mode)
        torch.testing.assert_close(full[:, :3], tiny_model(x[:, :3], t[:, :3], text), atol=1e-5, rtol=0)
        cache = KVCache(tiny.model.num_layers, mode.window)
        tiny_model(x[:, :6], t[:, :6], text, Cached(cache, 0, write_frames=6))
        torch.testing.assert_close(full[:, 6:], tiny_model(x[:, 6:], t[:, 6:], text, Cached(cache, 6)),
                                   atol=1e-5, rtol=0)
        # ... and the timesteps matter: the same block at other context timesteps differs.
        assert (full[:, 3:6] - tiny_model(x, t.flip(1), text, mode)[:, 3:6]).abs().max() > 1e-3


def test_rope_positions_are_relative_and_unbounded():
    """Frame indices far beyond any table (Wan's holds 1024) work, and attention logits depend only on
    distances: three frames placed at 5000 score like the same frames placed at 0."""
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, 3 * 4, 2, 16, generator=g).unbind(0)  # [B, F*T, H, Dh], 3 frames of 2x2
    logits = []
    for start in (0, 5000, 10**6):
        cos, sin = rope(torch.arange(start, start + 3), 2, 2)
        logits.append(torch.einsum("blhd,bmhd->bhlm", apply_rope(q, cos, sin), apply_rope(k, cos, sin)))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[2], logits[0], atol=1e-3, rtol=0)


def test_a_prepared_prompt_equals_raw_states(tiny_model, tiny_inputs):
    x, t, text = tiny_inputs
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x, t, tiny_model.prompt(text)), tiny_model(x, t, text), atol=0, rtol=0)


@pytest.mark.parametrize("backend", sorted(SDPA_KERNELS))
def test_each_sdpa_kernel_runs_as_the_default_or_refuses_before_compute(tiny, tiny_inputs, backend):
    """model.attention_backend=sdpa_*: SDPA held to one kernel. One that PyTorch can run here gives the
    default's output to float rounding (fused kernels sum in another order); one it cannot is refused
    at the forward's start, saying which and why, before the cache is written. On this CPU with
    PyTorch 2.13 the flash and math kernels run, efficient and cuDNN (CUDA only) are refused."""
    x, t, text = tiny_inputs
    cfg = load_config("tiny", [f"model.attention_backend={backend}"])
    default, held = random_model(tiny), random_model(cfg)  # the same weights
    window = BlockCausalWindow.from_config(tiny.video)
    try:
        check_attention_backend(backend, x.device, x.dtype, cfg.model.head_dim)
    except AttentionBackendError as err:
        assert f"model.attention_backend={backend} cannot attend" in str(err)
        cache = KVCache(cfg.model.num_layers, window)
        with pytest.raises(AttentionBackendError, match=backend), torch.no_grad():
            held(x[:, :3], t[:, :3], text, Cached(cache, 0, write_frames=3))
        assert cache.frames() == []
        return
    with torch.no_grad():
        for mode in (Bidirectional(), BlockCausal(window)):  # one call, and one call per block (query groups)
            torch.testing.assert_close(held(x, t, text, mode), default(x, t, text, mode), atol=1e-5, rtol=0)


def test_flash_attn_backend_needs_the_package_and_half_precision_cuda(tiny, tiny_inputs):
    x, t, text = tiny_inputs
    model = random_model(load_config("tiny", ["model.attention_backend=flash_attn"]))
    with pytest.raises(AttentionBackendError, match="model.attention_backend=flash_attn (needs the flash-attn package|"
                                                    "runs float16/bfloat16 on CUDA only)"):
        model(x, t, text)
