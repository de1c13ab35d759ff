#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one go (results in docs/benchmarks.md): the machine, the CUDA
# tests (tests/test_cuda.py), then the Wan2.1-1.3B benchmark rows (launch/bench.sh gpu).
#   bash launch/gpu_check.sh                          # with .venv
#   PYTHON=python3 OUT=/some/dir bash launch/gpu_check.sh   # a GPU image's python3 (torch, pyyaml, pytest,
#                                                           # deepspeed: on PYTHONPATH if not installed)
# Writes gpu_check_<date>.log and the benchmark JSON into $OUT (default docs/).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-docs}
log="$out/gpu_check_$(date +%Y-%m-%d).log"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$py" -m pytest -q tests/test_cuda.py
  BENCH_PYTHON=$py BENCH_OUT=$out bash launch/bench.sh gpu
} 2>&1 | tee "$log"
