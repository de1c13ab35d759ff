#!/usr/bin/env bash
# Everything a lent GPU machine checks, in one go (results in docs/benchmarks.md): the machine, the CUDA
# tests (tests/test_cuda.py: sampling, and every training program under NCCL), the Wan2.1-1.3B
# benchmark rows (launch/bench.sh gpu), then two rehearsals of full-scale distillation on this GPU with
# the one-GPU settings of docs/training.md (a 1.3B teacher, then the 14B one streamed from the host).
#   bash launch/gpu_check.sh                          # with .venv
#   PYTHON=python3 OUT=/some/dir bash launch/gpu_check.sh   # a GPU image's python3 (torch, pyyaml, pytest,
#                                                           # deepspeed: on PYTHONPATH if not installed)
# Writes gpu_check_<date>.log and the benchmark JSON into $OUT (default docs/benchmarks/).
#
#   bash launch/gpu_check.sh speed     # issue 33 alone, in at most 8 minutes (each step has a time limit,
#                                      # all of them BUDGET seconds, 560 by default)
# The CUDA tests of sampling and of the speed options (static cache, compiled blocks, overlapped decoding,
# fp8 linears, a 2-stage pipeline sharing the GPU; not the training ones), then the option rows of
# eval.bench at Wan2.1-1.3B's width and depth (random bf16 weights, window 21, 7 blocks) on a quarter of
# its pixels (240x416): the orders and hybrid_steps K = 1..3, static cache, decoding inline and overlapped
# (a random Wan VAE), each attention backend that runs, compiled blocks and fp8. Each run's JSON is saved
# after every row, so a step stopped at its limit keeps the rows it finished. A GPU image without
# diffusers (the Wan VAE) or torchao (fp8) gets them from wheels in $WHEELS, installed offline:
#   pip download --no-deps -d .gpu_wheels torchao==0.18.0 diffusers==0.42.1   # here, with internet access
#   echo /.gpu_wheels/ >> .git/info/exclude                                  # then carry .gpu_wheels
#   PYTHON=python3 WHEELS=.gpu_wheels OUT=$OUT bash launch/gpu_check.sh speed
#
#   BUDGET=560 bash launch/gpu_check.sh pending   # what no GPU has checked yet, most important first,
# all within BUDGET seconds (each step's limit is cut to what is left): every CUDA test (the training
# programs under NCCL included), the rehearsal of full-scale distillation with a 1.3B teacher on this
# one GPU, the speed rows as in `speed` (fp8 and compiled first), then the rehearsal with the 14B teacher
# streamed from the host. Takes WHEELS like `speed`; DeepSpeed
# (an sdist, no wheel) travels as an installed package folder on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-docs/benchmarks}
day=$(date +%Y-%m-%d)
export PYTHONUNBUFFERED=1
mode=${1:-all}
one_gpu=(train.deepspeed=configs/deepspeed/zero2_offload.json)  # the rehearsals' one-GPU settings
if [ "$mode" = speed ] || [ "$mode" = pending ]; then
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the repository, where nothing installed it
  if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_deps "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/gpu_check_deps:$PYTHONPATH
  fi
  end=$(( $(date +%s) + ${BUDGET:-560} ))
  within() {  # within CAP CMD...: run CMD for at most CAP seconds and never past the budget
    local cap=$1 left=$(( end - $(date +%s) )); shift
    if (( left < 20 )); then echo "SKIPPED (budget spent): $*"; return; fi
    echo "== $(date -u +%T) $*"
    timeout $(( cap < left ? cap : left )) "$@"; echo "== rc $?"
  }
  bench=("$py" -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks 7
         --repeats "${REPEATS:-2}" video.height=240 video.width=416)
  speed_rows() {  # the option rows, each JSON saved after every row; then every table again
    within 120 "${bench[@]}" --methods frame_first wavefront --options fp8 compiled fp8_compiled \
      --json "$out/bench_speed_${day}_compiled_fp8.json"
    within 110 "${bench[@]}" --methods frame_first wavefront hybrid_steps_1 hybrid_steps_2 hybrid_steps_3 \
      --options static decode decode_overlap --json "$out/bench_speed_${day}_options.json"
    within 50 "${bench[@]}" --methods frame_first --options backends --option_methods frame_first \
      --json "$out/bench_speed_${day}_backends.json"
  }
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    if [ "$mode" = speed ]; then
      within 180 "$py" -m pytest -q -rs tests/test_cuda.py tests/test_speed_options.py \
        -k "not training_programs and not rehearsal and not resumed_ema"
      speed_rows
    else
      within 240 "$py" -m pytest -q -rs --durations=8 tests/test_cuda.py tests/test_speed_options.py
      within 240 env PYTHON="$py" STEPS=7 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" \
        distill.teacher_model=wan1.3b
      speed_rows
      within 240 env PYTHON="$py" STEPS=2 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" \
        distill.teacher_sharding=zero3_offload
    fi
    for part in compiled_fp8 options backends; do  # again, for the runs a time limit stopped
      [ -f "$out/bench_speed_${day}_$part.json" ] && "$py" -m eval.bench table "$out/bench_speed_${day}_$part.json"
    done
    date -u
  } 2>&1 | tee "$out/gpu_check_${mode}_$day.log"
  exit 0
fi
log="$out/gpu_check_$day.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$py" -m pytest -q tests/test_cuda.py
  BENCH_PYTHON=$py BENCH_OUT=$out bash launch/bench.sh gpu
  PYTHON=$py STEPS=4 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" distill.teacher_model=wan1.3b
  PYTHON=$py STEPS=4 OUT=/tmp/rehearsal bash launch/rehearse.sh "${one_gpu[@]}" distill.teacher_sharding=zero3_offload
} 2>&1 | tee "$log"
