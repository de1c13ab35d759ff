#!/usr/bin/env bash
# The benchmarks recorded in docs/benchmarks.md; each writes its JSON under docs/ and prints the table.
#   bash launch/bench.sh cpu   # toy preset, 40 blocks, every order, a 2-stage pipeline, a 10x-longer wavefront row
#   bash launch/bench.sh gpu   # Wan2.1-1.3B geometry (random bf16 weights, 480x832, window 21) on cuda:0:
#                              # 21 and 81 latent frames, flash-attn when installed ("auto") and SDPA
# REPEATS (default 5 on the CPU, 3 on the GPU) sets the timed rollouts per row.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
day=$(date +%Y-%m-%d)
case "${1:-cpu}" in
  cpu)
    exec .venv/bin/python -m eval.bench run --config_path configs/toy/hiar.yaml --num_blocks 40 \
      --repeats "${REPEATS:-5}" --stages 2 --long_factor 10 --json "docs/bench_toy_cpu_$day.json" ;;
  gpu)
    for blocks in 7 27; do
      for backend in auto sdpa; do
        .venv/bin/python -m eval.bench run --config_path configs/hiar.yaml --device cuda --num_blocks "$blocks" \
          --repeats "${REPEATS:-3}" --json "docs/bench_wan1.3b_gpu_${day}_$((blocks * 3))f_$backend.json" \
          model.attention_backend="$backend"
      done
    done ;;
  *) echo "usage: bash launch/bench.sh cpu|gpu" >&2; exit 2 ;;
esac
