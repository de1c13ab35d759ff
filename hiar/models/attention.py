"""Who attends to whom in the Wan DiT: the three attention modes, RoPE and the attention kernel.

The modes differ in which keys a query sees; the block-causal ones follow the one window rule of
hiar/models/window.py, so the full-sequence forward and the KV cache agree on every frame.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hiar.config import ConfigError
from hiar.models.cache import KVCache, StaticKVCache
from hiar.models.window import BlockCausalWindow


# -- attention modes of the Wan DiT -------------------------------------------------------------


@dataclass(frozen=True)
class Bidirectional:
    """Every frame sees every frame: the teacher, the critic and the forward-KL regulariser."""


@dataclass(frozen=True)
class BlockCausal:
    """One forward over the whole sequence with the block-causal mask: training and ODE init."""

    window: BlockCausalWindow


@dataclass(frozen=True)
class Cached:
    """Frames [start_frame, start_frame + F) attend to the cache's earlier frames and to themselves
    (block-causally if the call spans several blocks). The first `write_frames` frames' K/V are then
    stored in the cache, overwriting what it held for them."""

    cache: KVCache | StaticKVCache
    start_frame: int
    write_frames: int = 0


AttentionMode = Bidirectional | BlockCausal | Cached


# -- rotary position embedding ------------------------------------------------------------------


class RotaryEmbedding:
    """3-axis RoPE (frame, row, column) of Wan, computed from absolute positions on the fly.

    There is no position table, so frame indices have no upper limit (multi-hour videos). Head
    channels are split as in Wan: rows and columns get 2 * (head_dim // 6) each, frames the rest.
    """

    def __init__(self, head_dim: int, theta: float):
        hw = 2 * (head_dim // 6)
        self.axis_dims = (head_dim - 2 * hw, hw, hw)
        self.theta = theta

    def _angles(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        freqs = self.theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        return positions.to(torch.float64)[:, None] * freqs[None, :]  # [P, dim / 2]

    def __call__(self, frames: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [F * height * width, 1, head_dim / 2] (float32) for frame indices `frames`."""
        device = frames.device
        f, h, w = (self._angles(p, d) for p, d in zip(
            (frames, torch.arange(height, device=device), torch.arange(width, device=device)), self.axis_dims))
        nf = len(frames)
        angles = torch.cat([
            f[:, None, None].expand(nf, height, width, -1),
            h[None, :, None].expand(nf, height, width, -1),
            w[None, None, :].expand(nf, height, width, -1),
        ], dim=-1).reshape(nf * height * width, 1, -1)
        return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x [B, L, H, D] by the angles behind cos/sin [L, 1, D / 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# -- kernel ---------------------------------------------------------------------------------------


@functools.cache
def _flash_attn_func():
    """flash-attn's kernel if the package is installed (GPU machines only), else None."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except ImportError:
        return None


# model.attention_backend -> the one PyTorch SDPA kernel it allows ("sdpa" and "auto" let PyTorch pick).
SDPA_KERNELS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}
_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendError(ConfigError):
    """The configured attention backend cannot run on this device, dtype or head size."""


@functools.cache
def check_attention_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Raise AttentionBackendError, saying why and what to use instead, when `backend` cannot attend
    `dtype` heads of `head_dim` on `device`. An SDPA kernel is probed with one tiny call, so PyTorch's
    own rules decide (a kernel held by `sdpa_kernel` that cannot serve a call fails rather than falls
    back). Cached: `WanModel` calls it at every forward, outside the (possibly compiled) blocks."""
    fix = "use model.attention_backend=sdpa (PyTorch picks a kernel that runs) or auto"
    if backend == "flash_attn":
        if _flash_attn_func() is None:
            raise AttentionBackendError(f"model.attention_backend=flash_attn needs the flash-attn package, which "
                                        f"is not installed: pip install flash-attn, or {fix}")
        if device.type != "cuda" or dtype not in _HALF:
            raise AttentionBackendError(f"model.attention_backend=flash_attn runs float16/bfloat16 on CUDA only, "
                                        f"not {dtype} on {device}: {fix}")
        return
    kernel = SDPA_KERNELS.get(backend)
    if kernel is None:
        return
    probe = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([kernel]):
                F.scaled_dot_product_attention(probe, probe, probe)
            return
        except RuntimeError as err:
            why = "PyTorch says: " + ("; ".join(str(w.message) for w in caught) or str(err))
    if device.type != "cuda" and kernel in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        why = "the kernel runs on CUDA only"  # PyTorch's CPU message blames disabled kernels instead
    raise AttentionBackendError(f"model.attention_backend={backend} cannot attend {dtype} heads of {head_dim} "
                                f"on {device} ({why}): {fix}")


# Query tokens -> the key tokens they see: a slice when those keys are contiguous, else an index.
QueryGroups = list[tuple[slice, slice | torch.Tensor]]


def query_groups(frame_mask: torch.Tensor, tokens: int, device: torch.device) -> QueryGroups | None:
    """The block-causal rule as one unmasked attention per run of query frames that see the same keys
    (a block, by `frame_mask`'s construction), or None when every query sees every key.

    Unmasked calls keep the fast kernels and skip the products a mask would throw away; a token mask
    sends SDPA to a masked kernel, with which a fused 6-frame forward took 1.5x the time of two 3-frame
    ones on an H200 (docs/benchmarks.md, 2026-11-26).
    """
    if bool(frame_mask.all()):
        return None
    rows, groups, first = frame_mask.tolist(), [], 0
    for end in range(1, len(rows) + 1):
        if end < len(rows) and rows[end] == rows[first]:
            continue
        keys = [f for f, visible in enumerate(rows[first]) if visible]
        if keys == list(range(keys[0], keys[-1] + 1)):
            seen = slice(keys[0] * tokens, (keys[-1] + 1) * tokens)
        else:  # a sink before a window: two runs of frames
            seen = (torch.tensor(keys)[:, None] * tokens + torch.arange(tokens)).flatten().to(device)
        groups.append((slice(first * tokens, end * tokens), seen))
        first = end
    return groups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: QueryGroups | None = None,
           backend: str = "auto") -> torch.Tensor:
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]; with `groups`, each
    group's queries see only its keys."""
    if groups is None:
        return _unmasked(q, k, v, backend)
    return torch.cat([_unmasked(q[:, rows], k[:, seen], v[:, seen], backend) for rows, seen in groups], dim=1)


def _unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """flash-attn serves half-precision CUDA calls when installed and `backend` is "auto", and every
    call with "flash_attn"; PyTorch SDPA serves everything else and is the tested path, held to one
    kernel by an "sdpa_*" backend (`check_attention_backend` has vetted the choice)."""
    if backend == "flash_attn" or (backend == "auto" and q.is_cuda and q.dtype in _HALF):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v)
    kernel = SDPA_KERNELS.get(backend)
    with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
