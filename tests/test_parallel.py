"""Pipelined inference under torchrun (gloo, CPU): equality with the sequential run, failure handling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import inference
from hiar.parallel import stage_steps

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--config_path", "tiny", "--prompt", "a red circle", "--num_output_frames", "9", "--seed", "1",
        "--save_latents", "--inference_method", "timestep_first"]


def torchrun(n: int, args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                             str(ROOT / "inference.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def latents(folder: Path) -> torch.Tensor:
    return load_file(folder / "a red circle-0.latents.safetensors")["latents"]


def test_stage_steps():
    assert stage_steps(4, 1) == [range(0, 4)]
    assert stage_steps(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_steps(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    with pytest.raises(ValueError, match="use --nproc_per_node <= 4"):
        stage_steps(4, 5)


@pytest.mark.parametrize("stages,extra", [(2, []), (4, []), (2, ["sampling.fused=true"]),
                                          (2, ["--switch", "b2", "a blue square", "--switch_mode", "recache"])])
def test_pipeline_equals_sequential_bit_exactly(tmp_path, stages, extra):
    # Same thread count as each stage: a CPU matmul's summation order depends on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert inference.main([*ARGS, "--output_folder", str(tmp_path / "seq"), *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(stages, [*ARGS, "--parallel", "pipeline", "--output_folder", str(tmp_path / "pipe"), *extra])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"{stages}-stage pipeline" in out
    assert torch.equal(latents(tmp_path / "pipe"), latents(tmp_path / "seq"))


def test_too_many_stages_refused_before_loading(tmp_path):
    proc = torchrun(5, [*ARGS, "--parallel", "pipeline", "--output_folder", str(tmp_path)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "use --nproc_per_node <= 4" in out
    assert "RANDOM weights" not in out  # no model was built


def test_a_killed_stage_ends_the_run_naming_it(tmp_path):
    # long enough to still be running when the stage is killed
    args = [*ARGS[:5], "3000", "--parallel", "pipeline", "--output_folder", str(tmp_path)]
    proc = torchrun(2, args)
    deadline = time.time() + 90
    victim = None
    while victim is None and time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                # the stage itself, not its ffmpeg child (which inherits RANK)
                if ("inference.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == "1"
                        and (tmp_path / "config.yaml").exists()):
                    victim = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.5)
    assert victim is not None, "the pipeline never started"
    time.sleep(2)
    victim.send_signal(signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - start < 30
    assert proc.returncode != 0
    assert "pipeline stage 0 stopped: rank 1 (" in out, out[-3000:]  # the survivor names it, not only torchrun
