"""The sampler on a CUDA device: the same video as on the CPU, bf16 close to fp32, the orders' identities
and a flat cache footprint; the speed options (issue 33: static cache, compiled blocks, overlapped
decoding, fp8 linears, a pipeline of two stages on one GPU) against their plain runs; and a resumed
training EMA following a CUDA model. Skipped without a GPU (CI has none); run on a lent GPU with
`python -m pytest tests/test_cuda.py` (launch/gpu_check.sh, results in docs/benchmarks.md)."""

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


def run(model, *overrides, device=CUDA, dtype=torch.float32, frames=18, prepare=None):
    """The video of a copy of `model` on `device` in `dtype` (`prepare(copy)` first, if given)."""
    cfg, noise, text = setup(*overrides, frames=frames)
    noise.device, noise.dtype = device, dtype
    model = copy.deepcopy(model).to(device, dtype)
    if prepare is not None:
        prepare(model)
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


# -- the speed options of issue 33 ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [["sampling.method=frame_first"], ["sampling.method=timestep_first"],
                                   ["sampling.method=timestep_first", "sampling.fused=true"]])
def test_static_cache_equals_the_dict_cache_on_cuda(cpu_model, dtype, extra):
    """Preallocated buffers written in place hold the same K/V in the same order: the same bits."""
    window = ["video.window_frames=9", "video.sink_frames=3"]
    assert torch.equal(run(cpu_model, "runtime.kv_cache=static", *window, *extra, dtype=dtype),
                       run(cpu_model, *window, *extra, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_compiled_blocks_equal_eager_on_cuda(cpu_model, dtype, tol):
    from torch._dynamo.utils import counters

    eager = run(cpu_model, "sampling.stepping=ode", dtype=dtype)
    graphs = counters["stats"]["unique_graphs"]
    compiled = run(cpu_model, "sampling.stepping=ode", "runtime.compile_blocks=true", dtype=dtype)
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not silently eager
    assert rel(compiled, eager) < tol


def random_wan_vae():
    """Wan2.1's VAE (diffusers' defaults) with random weights, on the GPU: a causal decoder with state."""
    diffusers = pytest.importorskip("diffusers")
    from hiar.codecs import WanVAE

    torch.manual_seed(0)
    return WanVAE(diffusers.AutoencoderKLWan().to(CUDA))


@pytest.mark.parametrize("codec", ["toy_dct", "wan_vae"])
def test_overlapped_decoding_equals_inline_on_cuda(cpu_model, codec):
    """Decoding on a side stream while the next block is generated gives the inline frames bit for bit."""
    from hiar.codecs import ToyDCTCodec
    from hiar.stream import Stream

    model = copy.deepcopy(cpu_model).to(CUDA)
    streams = []
    decoder = ToyDCTCodec() if codec == "toy_dct" else random_wan_vae()

    class Watched:  # which CUDA stream each decode ran on
        def stream_decoder(self):
            inner = decoder.stream_decoder()

            class Decode:
                def decode(self, latents):
                    streams.append(torch.cuda.current_stream())
                    return inner.decode(latents)

            return Decode()

    videos = []
    for overlap in (False, True):
        cfg, noise, text = setup("sampling.schedule=wavefront", frames=12)
        noise.device = CUDA
        with torch.no_grad():
            blocks = generate(model, text.to(CUDA), cfg, noise, 4)
            videos.append([b.frames.cpu() for b in Stream(blocks, Watched(), overlap=overlap)])
    assert len(videos[1]) == 4 and all(torch.equal(a, b) for a, b in zip(*videos, strict=True))
    inline, side = streams[:4], streams[4:]
    assert all(s == torch.cuda.default_stream() for s in inline)
    assert all(s != torch.cuda.default_stream() for s in side)


def test_fp8_linears_run_on_cuda(cpu_model):
    """torchao's fp8 linears (compute capability >= 8.9) stay close to bf16 and to the CPU-checked
    emulation of the same rounding (hiar/fp8.py)."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matrix products need compute capability >= 8.9")
    from hiar.fp8 import fp8_linears

    ode = "sampling.stepping=ode"
    bf16 = run(cpu_model, ode, dtype=torch.bfloat16)
    torchao = run(cpu_model, ode, dtype=torch.bfloat16, prepare=lambda m: fp8_linears(m, "torchao"))
    emulated = run(cpu_model, ode, dtype=torch.bfloat16, prepare=lambda m: fp8_linears(m, "emulate"))
    assert torch.isfinite(torchao).all()
    print(f"fp8 (torchao) vs bf16 {rel(torchao, bf16):.4f}, vs emulated {rel(torchao, emulated):.4f}; "
          f"emulated vs bf16 {rel(emulated, bf16):.4f}")
    assert 0 < rel(torchao, bf16) < 0.2 and rel(torchao, emulated) < 0.2


STAGE = """
import sys

import torch
from conftest import random_model, rollout_inputs

from hiar.config import load_config
from hiar.distributed import local_rank_device
from hiar.parallel import StageGroup, pipeline_stage
from hiar.sampling import CellRunner

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the test's full_fp32
cfg, noise, text = rollout_inputs("video.height=64", "video.width=64", "sampling.method=timestep_first", frames=18)
device = local_rank_device("cuda")
noise.device = device
model = random_model(load_config("tiny")).to(device)
group = StageGroup(len(cfg.schedule.denoising_steps))
with torch.no_grad():
    blocks = dict(pipeline_stage(CellRunner(model, text.to(device), cfg, noise), group, 6))
if group.is_last:
    torch.save(torch.cat([blocks[n] for n in range(6)], dim=1).cpu(), sys.argv[1])
group.close()
"""


def test_a_pipeline_of_two_stages_on_one_gpu_equals_sequential(cpu_model, tmp_path):
    """--parallel pipeline on CUDA tensors: two stages sharing the one GPU (gloo between them, NCCL refuses
    two ranks on one device) give the sequential video bit for bit."""
    import os
    from pathlib import Path

    script, out = tmp_path / "stage.py", tmp_path / "video.pt"
    script.write_text(STAGE)
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    torchrun(str(script), str(out), procs=2, env={"PYTHONPATH": path})
    assert torch.equal(torch.load(out), run(cpu_model, "sampling.method=timestep_first"))


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


# -- training on CUDA with NCCL: each program in its own process, as the launchers start them ----------


def torchrun(*args, procs: int = 1, env: dict | None = None) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]


def test_training_programs_on_cuda_with_nccl(tmp_path, distill_inputs):
    """ODE pairs, ODE initialisation and distillation (bf16, ZeRO-2, a ZeRO-3 teacher, accumulation, the
    finite-loss all-reduce) on the GPU under NCCL; what a CPU-only run with gloo could not show."""
    import json

    from hiar.checkpoints import save_model

    cfg = load_config("tiny")
    teacher = save_model(random_model(cfg), cfg, tmp_path / "teacher.safetensors")
    pairs = tmp_path / "pairs"
    torchrun("train/ode_pairs.py", "--config_path", "tiny", f"ode.teacher={teacher}", f"ode.output_dir={pairs}",
             "ode.num_trajectories=4", "ode.per_shard=2", "ode.steps=4", "ode.batch_size=2")
    torchrun("train/ode_init.py", "--config_path", "tiny", f"ode.teacher={teacher}", f"ode.output_dir={pairs}",
             f"train.output_dir={tmp_path / 'init'}", "train.steps=2", "train.batch_size=1", "train.total_batch_size=2",
             "train.bf16=true")
    out = tmp_path / "distill"
    torchrun("train/distill.py", "--config_path", "tiny", *distill_inputs, f"ode.output_dir={pairs}",
             f"distill.generator={tmp_path / 'init' / 'model.safetensors'}", "train.bf16=true",
             "train.deepspeed=configs/deepspeed/zero2.json", "distill.teacher_sharding=zero3",
             "train.total_batch_size=2", "train.gradient_checkpointing=true", "--max_steps", "2",
             f"train.output_dir={out}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(v == v for m in logged for v in m.values())
    assert (out / "model.safetensors").is_file()


def test_the_rehearsal_runs_on_cuda(tmp_path):
    torchrun("train/distill.py", "--rehearse", "--config_path", "tiny", "--max_steps", "3", "train.bf16=true",
             f"train.output_dir={tmp_path}", "train.save_every=0", "distill.dfake_gen_update_ratio=2")
