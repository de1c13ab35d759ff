#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one go (results in docs/benchmarks.md): the machine, the CUDA
# tests (tests/test_cuda.py: sampling, and every training program under NCCL), the Wan2.1-1.3B
# benchmark rows (launch/bench.sh gpu), then two rehearsals of full-scale distillation on this GPU with
# the one-GPU settings of docs/training.md (a 1.3B teacher, then the 14B one streamed from the host).
#   bash launch/gpu_check.sh                          # with .venv
#   PYTHON=python3 OUT=/some/dir bash launch/gpu_check.sh   # a GPU image's python3 (torch, pyyaml, pytest,
#                                                           # deepspeed: on PYTHONPATH if not installed)
# Writes gpu_check_<date>.log and the benchmark JSON into $OUT (default docs/benchmarks/).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-docs/benchmarks}
log="$out/gpu_check_$(date +%Y-%m-%d).log"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$py" -m pytest -q tests/test_cuda.py
  BENCH_PYTHON=$py BENCH_OUT=$out bash launch/bench.sh gpu
  one_gpu=(train.deepspeed=configs/deepspeed/zero2_offload.json)
  PYTHON=$py STEPS=4 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" distill.teacher_model=wan1.3b
  PYTHON=$py STEPS=4 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" distill.teacher_sharding=zero3_offload
} 2>&1 | tee "$log"
