#!/usr/bin/env bash
# Rehearse full-scale distillation before downloading anything: train/distill.py --rehearse on the
# config's real sizes with random weights, random prompts and trajectories, for a few iterations on
# every GPU of this machine (or the CPU), then print seconds per iteration and memory per component
# next to the planner's estimate (python train/plan.py).
#   bash launch/rehearse.sh                                   # configs/hiar.yaml on this machine's GPUs
#   CONFIG=configs/tiny.yaml STEPS=2 bash launch/rehearse.sh  # the tiny preset, what CI runs on the CPU
#   bash launch/rehearse.sh distill.teacher_model=wan1.3b     # any section.key=value override
#   PYTHON=python3 bash launch/rehearse.sh                    # a GPU image's python instead of .venv
# Updates take one micro-step each here (train.total_batch_size=0); the config's total batch takes
# total / (GPUs x train.batch_size) of them (TOTAL=64 to rehearse exactly that). STEPS counts iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then source launch/env.sh; fi
py=${PYTHON:-.venv/bin/python}
config=${CONFIG:-configs/hiar.yaml}
steps=${STEPS:-6}
out=${OUT:-runs/rehearsal}
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$(( gpus > 0 ? gpus : 1 ))" \
  train/distill.py --rehearse \
  --config_path "$config" --max_steps "$steps" "train.output_dir=$out" train.sample_every=0 train.save_every=0 \
  train.log_every=1 "train.total_batch_size=${TOTAL:-0}" "$@"
