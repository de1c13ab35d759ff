#!/usr/bin/env bash
# The whole toy recipe on a CPU: teacher -> ODE pairs -> ODE initialisation -> the distillation variants
# -> short-clip fidelity and long rollouts of every variant -> the table in docs/results.md.
#   bash launch/reproduce_toy.sh            # every stage; rerun after a crash to continue
#   VARIANTS="hiar self_forcing" bash launch/reproduce_toy.sh
# A stage whose output exists is skipped (training stages resume from their checkpoints), and each
# stage's wall-clock is appended to runs/toy/timings.tsv. EVALUATE=0 skips the evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
py=.venv/bin/python
variants=${VARIANTS:-"hiar self_forcing hiar_no_fkl hiar_ctx_current hiar_ctx_clean"}
mkdir -p runs/toy

stage() {  # stage NAME OUTPUT COMMAND...
  local name=$1 out=$2
  shift 2
  if [ -e "$out" ]; then
    echo "== $name: $out exists, skipped"
    return
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  printf '%s\t%s\t%d s\t%s\n' "$(date -u +%FT%TZ)" "$name" $((SECONDS - start)) "$(nproc) cores" >> runs/toy/timings.tsv
}

stage teacher runs/toy/teacher/model.safetensors $py train/teacher.py --config_path configs/toy/teacher.yaml --resume
stage ode_pairs runs/toy/ode_pairs/manifest.json $py train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml
stage ode_init runs/toy/ode_init/model.safetensors $py train/ode_init.py --config_path configs/toy/ode_init.yaml --resume
for variant in $variants; do
  stage "$variant" "runs/toy/$variant/model.safetensors" \
    $py train/distill.py --config_path "configs/toy/$variant.yaml" --resume
done
if [ "${EVALUATE:-1}" = 1 ]; then
  start=$SECONDS
  $py -m eval.toy_results --runs runs/toy --out runs/toy/results --doc docs/results.md
  printf '%s\t%s\t%d s\t%s\n' "$(date -u +%FT%TZ)" evaluation $((SECONDS - start)) "$(nproc) cores" >> runs/toy/timings.tsv
fi
