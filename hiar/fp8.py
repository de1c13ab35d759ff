"""FP8 linear layers for sampling (runtime.fp8_linear): the transformer blocks' Linear layers multiply in
float8 e4m3 with one scale per tensor, the weight's fixed once, the input's taken at every call
(dynamic quantisation). Applied to a model from outside, in place, like `compile_blocks`.

* "torchao": torchao's `Float8DynamicActivationFloat8WeightConfig` (per-tensor scales), fp8 matrix
  products on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper). torchao is imported only here and
  only then; the device is checked before any compute. Eager, it is slower than bf16 (3-4x on one
  H200, docs/benchmarks.md): the input's cast and scale run as kernels of their own, which only
  `runtime.compile_blocks` fuses. Sampling warns when it is asked for without compiled blocks.
* "emulate": the same rounding on any device and dtype: weights and inputs go through float8_e4m3fn
  with per-tensor scales, the products run in the model's dtype. What fp8 costs in quality, measurable
  on the CPU; it is no faster.

The patch embedding, the condition embedder and the output head stay in the model's dtype: a small
share of the FLOPs, and the head's error would go straight into the predicted flow.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from hiar.config import ConfigError

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
TORCHAO_VERSION = "0.18.0"  # the version checked against torch 2.13
_converted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the mode it was converted to


class FP8Unavailable(ConfigError):
    """runtime.fp8_linear=torchao cannot run here (no torchao, or a device without fp8 matrix products)."""


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded through float8 e4m3 with one scale for the tensor (amax -> 448), back in x's dtype."""
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # clamp: beyond 448 is NaN
    return (q.float() * scale).to(x.dtype)


def _round_input(module: nn.Linear, args: tuple) -> tuple:
    return (round_fp8(args[0]), *args[1:])


def block_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers fp8 converts: those of the transformer blocks."""
    return [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]


def check_torchao(device: torch.device) -> None:
    """Raise FP8Unavailable, saying what to do, unless torchao's fp8 linears can run on `device`."""
    emulate = "runtime.fp8_linear=emulate measures its quality on any device"
    if device.type != "cuda":
        raise FP8Unavailable(f"runtime.fp8_linear=torchao runs on CUDA GPUs of compute capability >= 8.9, "
                             f"not on {device}: {emulate}, runtime.fp8_linear=off runs without it")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise FP8Unavailable(f"runtime.fp8_linear=torchao needs compute capability >= 8.9 (Ada, Hopper) for fp8 "
                             f"matrix products; {torch.cuda.get_device_name(device)} has "
                             f"{capability[0]}.{capability[1]}: use runtime.fp8_linear=off, or {emulate}")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise FP8Unavailable(f"runtime.fp8_linear=torchao needs the torchao package ({err}): "
                             f"pip install torchao=={TORCHAO_VERSION}, or use runtime.fp8_linear=off") from None


def fp8_linears(model: nn.Module, mode: str) -> None:
    """Convert the transformer blocks' Linear layers of `model` (a WanModel) in place to `mode` ("off":
    nothing). Converting again to the same mode changes nothing; to another one raises (the weights are
    already rounded)."""
    if mode == "off":
        return
    done = _converted.get(model)
    if done == mode:
        return
    if done is not None:
        raise ValueError(f"this model's linears are already fp8 ({done}); build a fresh model for {mode}")
    if mode == "torchao":
        check_torchao(next(model.parameters()).device)
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

        linears = set(block_linears(model))
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(), filter_fn=lambda m, fqn: m in linears)
    elif mode == "emulate":
        with torch.no_grad():
            for linear in block_linears(model):
                linear.weight.copy_(round_fp8(linear.weight))
                linear.register_forward_pre_hook(_round_input)
    else:
        raise ValueError(f"runtime.fp8_linear={mode!r}: expected off, torchao or emulate")
    _converted[model] = mode
