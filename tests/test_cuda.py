"""The sampler on a CUDA device: the same video as on the CPU, bf16 close to fp32, the orders' identities
and a flat cache footprint; and a resumed training EMA following a CUDA model. Skipped without a GPU (CI
has none); run on a lent GPU with `python -m pytest tests/test_cuda.py` (launch/gpu_check.sh, results in
docs/benchmarks.md)."""

import copy

import pytest
import torch

from hiar.config import load_config
from hiar.sampling import generate, sample_video

from conftest import random_model, rollout_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 means fp32: no TF32 in matrix products or convolutions (the patch embedding is a Conv3d)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def setup(*overrides, frames=18):
    """The tiny preset at 64x64 (16 tokens a frame)."""
    return rollout_inputs("video.height=64", "video.width=64", *overrides, frames=frames)


@pytest.fixture(scope="module")
def cpu_model():
    return random_model(load_config("tiny"))


def run(model, *overrides, device=CUDA, dtype=torch.float32, frames=18):
    cfg, noise, text = setup(*overrides, frames=frames)
    noise.device, noise.dtype = device, dtype
    model = copy.deepcopy(model).to(device, dtype)
    with torch.no_grad():
        return sample_video(model, text.to(device, dtype), cfg, noise, frames // 3).float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("extra", [["sampling.method=frame_first"], ["sampling.method=timestep_first"],
                                   ["sampling.method=timestep_first", "sampling.fused=true"]])
def test_cuda_video_equals_the_cpu_video(cpu_model, extra):
    cpu = run(cpu_model, *extra, device=torch.device("cpu"))
    cuda = run(cpu_model, *extra)
    assert rel(cuda, cpu) < 1e-4


def test_bf16_stays_close_to_fp32(cpu_model):
    fp32 = run(cpu_model, "sampling.method=timestep_first")
    bf16 = run(cpu_model, "sampling.method=timestep_first", dtype=torch.bfloat16)
    assert torch.isfinite(bf16).all()
    # bf16 rounds each operand at ~4e-3; a 4-step rollout of 6 blocks compounds it a few times
    # (5e-3 on the CPU's bf16 kernels)
    assert rel(bf16, fp32) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_major_equals_wavefront_on_cuda(cpu_model, dtype):
    """The same cells, the same inputs, only their order differs: the same kernels give the same bits."""
    a = run(cpu_model, "sampling.schedule=step_major", dtype=dtype)
    b = run(cpu_model, "sampling.schedule=wavefront", dtype=dtype)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_equals_unfused_on_cuda(cpu_model, dtype, tol):
    """Fused forwards attend per query block over two blocks (query_groups), unfused ones over one."""
    unfused = run(cpu_model, "sampling.method=timestep_first", dtype=dtype)
    fused = run(cpu_model, "sampling.method=timestep_first", "sampling.fused=true", dtype=dtype)
    assert rel(fused, unfused) < tol


def test_windowed_rollout_memory_is_flat_on_cuda(cpu_model):
    """A wavefront rollout 8x longer than a window allocates no more at its peak than one window's worth."""
    model = copy.deepcopy(cpu_model).to(CUDA)
    peaks = []
    for blocks in (4, 32):
        cfg, noise, text = setup("sampling.schedule=wavefront", "video.window_frames=9", frames=3 * blocks)
        noise.device = CUDA
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            for _, block in generate(model, text.to(CUDA), cfg, noise, blocks):
                block.cpu()  # the caller keeps its blocks off the device
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] <= 1.05 * peaks[0], peaks


def test_a_resumed_ema_follows_a_cuda_model(cpu_model):
    """The EMA lives on the host (a resumed one too); its update averages the CUDA weights into it."""
    from hiar.training import EMA

    model = copy.deepcopy(cpu_model).to(CUDA)
    ema = EMA(decay=0.5, start=0)
    zeros = {k: torch.zeros_like(v.float(), device="cpu") for k, v in model.state_dict().items()}
    ema.load_state_dict({"shadow": zeros})
    ema.update(model, step=1)
    weight = model.state_dict()["proj_out.weight"]
    assert ema.shadow["proj_out.weight"].device.type == "cpu"
    assert torch.equal(ema.shadow["proj_out.weight"], weight.float().cpu() * 0.5)
