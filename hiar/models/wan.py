"""The Wan2.1 DiT, one implementation for teacher, critic and causal student.

Parameter names equal those of diffusers' `WanTransformer3DModel`, so diffusers-layout weights load
with `load_state_dict`. What differs is the interface:
* latents are [B, F, C, H, W] (frames first, as everywhere in HiAR) and timesteps are per frame [B, F];
* the attention mode (`Bidirectional`, `BlockCausal`, `Cached`, see attention.py) is an argument;
* RoPE positions are absolute frame indices without a table, so a video may run for hours.

Plain single-device PyTorch: parallelism, activation checkpointing and compilation are applied from
outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hiar.config import ModelConfig
from hiar.models.attention import (
    AttentionMode,
    Bidirectional,
    BlockCausal,
    Cached,
    QueryGroups,
    RotaryEmbedding,
    apply_rope,
    attend,
    check_attention_backend,
    query_groups,
)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype, as Wan does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] embedding of (float) timesteps t [...] -> [..., dim], computed in float64 as Wan does."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class _MLP(nn.Module):
    """Linear -> activation -> Linear, with diffusers' attribute names `linear_1`, `linear_2`."""

    def __init__(self, dim_in: int, dim: int, activation: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (embedding, 6 modulation vectors); umT5 text states -> model width."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _MLP(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _MLP(text_dim, dim, nn.GELU(approximate="tanh"))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # t [B, F] -> temb [B, F, D], modulation [B, F, 6, D]
        temb = self.time_embedder(timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype))
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


class Attention(nn.Module):
    """Multi-head attention with RMS-normed queries and keys (diffusers' `WanAttention` names)."""

    def __init__(self, dim: int, num_heads: int, eps: float, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only to keep diffusers' key 'to_out.0'
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> queries [B, L, H, D/H]."""
        return self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))

    def key_value(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, Ls, D] -> keys, values [B, Ls, H, D/H]."""
        k = self.norm_k(self.to_k(source)).unflatten(-1, (self.num_heads, -1))
        return k, self.to_v(source).unflatten(-1, (self.num_heads, -1))

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: QueryGroups | None) -> torch.Tensor:
        return self.to_out[0](attend(q, k, v, groups, self.backend).flatten(-2).type_as(q))


class _InputProjection(nn.Module):
    """Holds the feed-forward's first Linear as `proj`, where diffusers' GELU module keeps it."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, ffn_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        # diffusers' layout: net.0.proj (in), net.1 (dropout), net.2 (out); Identity keeps the indices.
        self.net = nn.ModuleList([_InputProjection(dim, ffn_dim), nn.Identity(), nn.Linear(ffn_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Prompt:
    """A prompt as every layer's cross-attention sees it: its keys and values, one pair per layer.

    `WanModel.prompt(states)` builds it once so that inference reuses it for every block and step;
    a forward given raw states builds it on the fly (training, where the weights change).
    """

    def __init__(self, model: WanModel, states: torch.Tensor):
        # states [B, Lt, text_dim] -> per layer (k, v) [B, Lt, H, D/H]
        embedded = model.condition_embedder.text_embedder(states.to(model.patch_embedding.weight.dtype))
        self.key_values = [block.attn2.key_value(embedded) for block in model.blocks]
        self.batch = states.shape[0]


class SelfAttentionContext:
    """What one forward's self-attention layers share: RoPE angles, query groups, and the cache traffic.

    Built once per forward by `WanModel`, outside the transformer blocks; each layer calls `__call__`
    with its own projections. A layer may be called a second time: activation checkpointing recomputes
    a block in backward, possibly long after the forward, when the rollout has moved on and the cache
    has evicted or replaced this forward's context frames. So the context K/V are captured when the
    forward starts, and the cache is written only on a layer's first call.
    """

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor], groups: QueryGroups | None,
                 mode: AttentionMode, context_frames: list[int], num_frames: int, backend: str):
        self.rope = rope  # cos, sin [F*T, 1, Dh/2] at this call's absolute frame positions
        self.groups = groups  # the block-causal rule (None: every query sees every key)
        self.mode = mode
        self.context_frames = context_frames
        self.num_frames = num_frames  # F
        self.backend = backend
        # Per layer, what the cache gives for the context frames, taken now, before any layer of this
        # forward writes (KVCache: the cache's own (k, v) [B, T, H, Dh] of each frame, references, not a
        # concatenated copy, so the snapshot costs no memory beyond keeping those frames alive while a
        # pending backward may recompute a block; the cache never modifies a stored tensor in place, so
        # these stay what the forward read). A missing frame raises CacheMissError here, at the start.
        self._context: list = []
        if isinstance(mode, Cached):
            self._context = mode.cache.snapshot(context_frames)
        self._written: set[int] = set()  # layers that have written the cache: a later call is a recompute

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k (rotated), v [B, F*T, H, Dh] of this call's frames -> attention output [B, F*T, H*Dh]
        k_all, v_all = k, v
        cached = isinstance(self.mode, Cached)
        if cached:
            context = self._context[layer]
            if context is None:
                raise RuntimeError(f"self-attention layer {layer} ran again after a forward without grad; "
                                   "a SelfAttentionContext serves one forward (and its recomputes)")
            # [B, C*T + F*T, H, Dh]: the snapshot's frames in order, then this call's
            k_all, v_all = self.mode.cache.with_context(layer, context, *self._frames(k, v))
        out = attend(q, k_all, v_all, self.groups, self.backend).flatten(-2).type_as(q)
        # The write follows the attention: a static cache's eviction moves the slots k_all may view.
        if cached and self.mode.write_frames and layer not in self._written:
            # Once per layer: a recompute must not store its K/V again (it would replace what later
            # blocks wrote with this forward's, and evict by this forward's position).
            self._written.add(layer)
            n = self.mode.write_frames
            self.mode.cache.write(layer, self.mode.start_frame, *(t[:, :n] for t in self._frames(k, v)))
        if cached and not torch.is_grad_enabled():
            # No autograd graph, so no recompute: let the frames this forward's writes evicted go now
            # rather than at the end of the forward (inference keeps the cache at one window).
            self._context[layer] = None
        return out

    def _frames(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """[B, F*T, H, Dh] -> [B, F, T, H, Dh] views."""
        return [t.unflatten(1, (self.num_frames, -1)) for t in tensors]


class WanBlock(nn.Module):
    """Self-attention, cross-attention to the prompt, feed-forward; AdaLN-modulated per frame."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_heads, cfg.eps, cfg.attention_backend)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)  # Wan's cross-attention norm
        self.attn2 = Attention(dim, cfg.num_heads, cfg.eps, cfg.attention_backend)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, layer: int, x: torch.Tensor, modulation: torch.Tensor, text: Prompt,
                self_attention: SelfAttentionContext) -> torch.Tensor:
        # x [B, F, T, D]; modulation [B, F, 6, D] (float32); text: the prompt's K/V for every layer
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + modulation.float()).unsqueeze(3).unbind(2)
        # 1. self-attention over frames (mode-dependent), gated per frame; 2. cross-attention; 3. feed-forward.
        # Between the two pure-tensor halves the attention reads and writes the cache; runtime.compile_blocks
        # compiles the halves only (`compile_blocks`). Nested calls keep no intermediate alive past its use.
        return self.after_self_attention(
            x, self_attention(layer, *self.self_attention_input(x, shift, scale, *self_attention.rope)),
            gate, c_shift, c_scale, c_gate, *text.key_values[layer])

    def self_attention_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (rotated to their frames' positions) and values [B, F*T, H, Dh] of x [B, F, T, D]."""
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x).flatten(1, 2)
        q, (k, v) = self.attn1.query(h), self.attn1.key_value(h)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def after_self_attention(self, x: torch.Tensor, attended: torch.Tensor, gate: torch.Tensor, c_shift: torch.Tensor,
                             c_scale: torch.Tensor, c_gate: torch.Tensor, text_k: torch.Tensor,
                             text_v: torch.Tensor) -> torch.Tensor:
        """The rest of the block from the self-attention's output `attended` [B, F*T, H*Dh]."""
        x = (x.float() + self.attn1.to_out[0](attended).unflatten(1, x.shape[1:3]).float() * gate).type_as(x)
        del attended  # not kept through the cross-attention and feed-forward (eager peak memory)

        # 2. cross-attention to every prompt token (padding included, as Wan does: no text mask)
        h = self.norm2(x.float()).type_as(x).flatten(1, 2)
        x = x + self.attn2.output(self.attn2.query(h), text_k, text_v, None).unflatten(1, x.shape[1:3])

        # 3. feed-forward, gated per frame
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class WanModel(nn.Module):
    """Wan2.1 text-to-video DiT predicting the flow v = eps - x0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def _self_attention(self, mode: AttentionMode, num_frames: int, grid: tuple[int, int],
                        device: torch.device) -> SelfAttentionContext:
        """Positions, query groups and cache context of one call with `num_frames` frames."""
        start = mode.start_frame if isinstance(mode, Cached) else 0
        frames = torch.arange(start, start + num_frames)
        rope = self.rope(frames.to(device), *grid)
        backend = self.config.attention_backend
        if isinstance(mode, Bidirectional):
            return SelfAttentionContext(rope, None, mode, [], num_frames, backend)
        window = mode.window if isinstance(mode, BlockCausal) else mode.cache.window
        context = window.context_frames(start, start + num_frames) if isinstance(mode, Cached) else []
        keys = torch.cat([torch.tensor(context, dtype=frames.dtype), frames])
        groups = query_groups(window.frame_mask(frames, keys), grid[0] * grid[1], device)
        return SelfAttentionContext(rope, groups, mode, context, num_frames, backend)

    def prompt(self, states: torch.Tensor) -> Prompt:
        """Prompt states [B, Lt, text_dim] -> the cross-attention K/V of every layer, to reuse."""
        return Prompt(self, states)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, text: torch.Tensor | Prompt,
                attention: AttentionMode = Bidirectional()) -> torch.Tensor:
        """x [B, F, C, H, W] noisy latents, t scalar / [B] / [B, F] timesteps (floats in [0, 1000]),
        text: prompt states [B, Lt, text_dim] or a `Prompt` -> predicted flow [B, F, C_out, H, W]."""
        cfg = self.config
        b, f, _, height, width = x.shape
        _, ph, pw = cfg.patch_size
        grid = (height // ph, width // pw)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64 if not torch.is_tensor(t) else None)
        t = t.reshape(-1, 1).expand(b, f) if t.ndim < 2 else t  # [B, F]

        # 1. patchify: [B, F, C, H, W] -> tokens [B, F, T, D]
        weight = self.patch_embedding.weight
        check_attention_backend(cfg.attention_backend, x.device, weight.dtype, cfg.head_dim)
        tokens = self.patch_embedding(x.to(weight.dtype).transpose(1, 2))  # [B, D, F, h, w]
        tokens = tokens.flatten(3).permute(0, 2, 3, 1)

        # 2. condition: per-frame timestep embedding and modulation; the prompt's cross-attention K/V
        temb, modulation = self.condition_embedder(t)
        prompt = text if isinstance(text, Prompt) else Prompt(self, text)

        # 3. transformer blocks; the attention mode decides what each frame sees
        self_attention = self._self_attention(attention, f, grid, x.device)
        for layer, block in enumerate(self.blocks):
            tokens = block(layer, tokens, modulation, prompt, self_attention)

        # 4. output head: per-frame AdaLN, projection, unpatchify -> [B, F, C_out, H, W]
        shift, scale = (self.scale_shift_table + temb.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = self.proj_out(tokens)  # [B, F, T, pt*ph*pw*C]
        out = out.reshape(b, f, *grid, 1, ph, pw, cfg.out_channels)
        return out.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(b, f, cfg.out_channels, height, width)


def compile_blocks(model: WanModel) -> None:
    """torch.compile each transformer block's two pure-tensor halves, in place (runtime.compile_blocks).

    The self-attention between them stays eager: its cache traffic is Python bookkeeping on frame
    indices that change every call, which a compiled graph would guard on and recompile for. The
    parameters keep their names (no wrapper module), so checkpoints load and save as before. Calling
    it again changes nothing.
    """
    for block in model.blocks:
        for name in ("self_attention_input", "after_self_attention"):
            if name not in vars(block):  # not yet compiled (an instance attribute shadows the method)
                setattr(block, name, torch.compile(getattr(block, name)))


def diffusers_transformer_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of diffusers' `WanTransformer3DModel` for the same architecture."""
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps)
