#!/usr/bin/env bash
# Long tuning on the toy world (docs/lora.md): the embedded HiAR student tuned on rollouts four windows
# long (configs/toy/hiar_lora_long.yaml) through LoRA adapters and, with the same steps, whole
# (lora.rank=0, train.lr=$FULL_LR); then rollouts of $LENGTHS seconds of the two and of the untuned
# student from the same noise, their drift (eval.rollout, eval.report), and a table of drift, toy
# presence, peak training memory and the size of what each run ships (eval.lora_long).
#   bash launch/lora_long.sh          # needs runs/toy/teacher_long and runs/toy/ode_pairs,
#                                     # launch/reproduce_toy.sh's first stages
#   STEPS=40 LENGTHS=60 PROMPTS=data/toy_prompts.txt OUT=runs/lora_small bash launch/lora_long.sh \
#       distill.teacher=runs/lora_small/teacher/model.safetensors \
#       distill.critic=runs/lora_small/teacher/model.safetensors \
#       distill.fkl_weight=0          # the small run of docs/lora.md
# Trailing section.key=value arguments go to both training runs. A finished stage is skipped, a
# training stage resumes, so rerunning continues. JOBS=2 (the default with two cores or more) trains the
# two at once, nproc/2 threads each, each logging to $OUT/<variant>.log; JOBS=1 one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
py=.venv/bin/python
out=${OUT:-runs/toy/lora_long}
steps=${STEPS:-400}
lengths=${LENGTHS:-"60 300"}
prompts=${PROMPTS:-data/toy_prompts.txt}
full_lr=${FULL_LR:-1.0e-4}  # the toy recipe's generator rate (configs/toy/hiar.yaml)
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
jobs=${JOBS:-$((cores < 2 ? 1 : 2))}  # the two training runs side by side, as launch/reproduce_toy.sh's variants
threads=$((cores / jobs > 0 ? cores / jobs : 1))
mkdir -p "$out"

train() {  # train VARIANT: one training run of the comparison
  local variant=$1 overrides=("train.output_dir=$out/$1" "train.steps=$steps")
  shift
  [ "$variant" = full ] && overrides+=(lora.rank=0 "train.lr=$full_lr")
  echo "== $variant: train/distill.py --config_path configs/toy/hiar_lora_long.yaml ${overrides[*]} $*"
  # GNU time's maximum resident set size: the training process's peak memory (eval.lora_long reads it)
  /usr/bin/time -v -o "$out/$variant.time" $py train/distill.py --config_path configs/toy/hiar_lora_long.yaml \
    --resume "${overrides[@]}" "$@"
}

pids=()
for variant in lora full; do
  if [ -e "$out/$variant/model.safetensors" ]; then
    echo "== $variant: $out/$variant/model.safetensors exists, skipped"
  elif [ "$jobs" -gt 1 ]; then  # nproc / JOBS threads each; the output in $out/$variant.log
    echo "== $variant: training in the background, log $out/$variant.log"
    OMP_NUM_THREADS=$threads train "$variant" "$@" > "$out/$variant.log" 2>&1 &
    pids+=($!)
  else
    train "$variant" "$@"
  fi
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "a training run failed: see $out/lora.log, $out/full.log" >&2; exit 1; }
done

for seconds in $lengths; do
  run=$out/eval_${seconds}s
  if [ ! -e "$run/scores.json" ]; then
    $py -m eval.rollout --out "$run" --config_path configs/toy/hiar.yaml --data_path "$prompts" --seconds "$seconds" \
      --method none=checkpoints/toy_hiar.safetensors --method "lora=$out/lora/model.safetensors" \
      --method "full=$out/full/model.safetensors"
  fi
  $py -m eval.report "$run"
done
$py -m eval.lora_long "$out"
