#!/usr/bin/env bash
# The benchmarks recorded in docs/benchmarks.md; each writes its JSON under docs/benchmarks/ and prints the table.
#   bash launch/bench.sh cpu   # toy preset, 40 blocks, every order, a 2-stage pipeline, a 10x-longer wavefront row
#   bash launch/bench.sh gpu   # Wan2.1-1.3B geometry (random bf16 weights, 480x832, window 21) on cuda:0:
#                              # 21 latent frames in every order, 81 in frame_first, step_major and fused;
#                              # flash-attn ("auto") when installed, then SDPA alone too
# REPEATS (default 5 on the CPU, 3 / 2 on the GPU) sets the timed rollouts per row. BENCH_PYTHON runs
# another interpreter than .venv's (a GPU image's python3 with torch and pyyaml is enough); BENCH_OUT
# writes the JSON elsewhere than docs/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BENCH_PYTHON:-}" ]; then py=$BENCH_PYTHON; else source launch/env.sh; py=.venv/bin/python; fi
out=${BENCH_OUT:-docs/benchmarks}
day=$(date +%Y-%m-%d)
case "${1:-cpu}" in
  cpu)
    exec "$py" -m eval.bench run --config_path configs/toy/hiar.yaml --num_blocks 40 \
      --repeats "${REPEATS:-5}" --stages 2 --long_factor 10 --json "$out/bench_toy_cpu_$day.json" ;;
  gpu)
    backends=auto
    if "$py" -c "import flash_attn" 2>/dev/null; then backends="auto sdpa"; fi  # else auto is SDPA already
    for backend in $backends; do
      "$py" -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks 7 --repeats "${REPEATS:-3}" \
        --json "$out/bench_wan1.3b_gpu_${day}_21f_$backend.json" model.attention_backend="$backend"
      "$py" -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks 27 --repeats "${REPEATS:-2}" \
        --methods frame_first step_major fused \
        --json "$out/bench_wan1.3b_gpu_${day}_81f_$backend.json" model.attention_backend="$backend"
    done ;;
  *) echo "usage: bash launch/bench.sh cpu|gpu" >&2; exit 2 ;;
esac
