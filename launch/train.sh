#!/usr/bin/env bash
# Any train/ program under the DeepSpeed launcher, on one machine or many.
#   bash launch/train.sh train/teacher.py --config_path configs/toy/teacher.yaml
#   HOSTFILE=hostfile MASTER_ADDR=node1 bash launch/train.sh train/ode_init.py --config_path configs/toy/ode_init.yaml
# A hostfile has one line per node: "node1 slots=8". NUM_GPUS limits the devices per node (CPU runs: 1).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
args=()
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
exec .venv/bin/deepspeed "${args[@]}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" "$@"
