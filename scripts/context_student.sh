#!/usr/bin/env bash
# Does the causal student keep the direction word of a teacher trained with train.context_noise, and what
# does distillation cost it against its ODE initialisation? An experiment, not part of the recipe
# (docs/toy_prompts.md, "The student of the context teacher").
#
# The world and model of the DCT context teacher (6 latent frames, 1x1-latent tokens, the world that
# wraps): ODE pairs -> ODE initialisation -> distillation variants (configs/toy/hiar.yaml and each
# variant's overrides below, 400 iterations) -> eval.toy_fidelity of each (template and held-out
# phrasings, $CLIPS clips). A stage whose output exists is skipped, training stages resume.
#   bash scripts/context_student.sh                                  # about 1 h on one thread
#   TEACHER=runs/toy/teacher_ctx_dct/model.safetensors RUNS=runs/toy/ctx_dct bash scripts/context_student.sh
# The teacher: docs/toy_prompts.md, "The direction word, learnt" (its DCT command).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
py=.venv/bin/python
teacher=${TEACHER:-runs/toy/teacher_ctx_dct/model.safetensors}
runs=${RUNS:-runs/toy/ctx_dct}
clips=${CLIPS:-160}
world=(video.num_latent_frames=6 "model.patch_size=[1,1,1]" video.toy_motion=wrap)
[ -e "$teacher" ] || { echo "error: no teacher at $teacher (docs/toy_prompts.md says how to train it)" >&2; exit 2; }
mkdir -p "$runs"

[ -e "$runs/ode_pairs/manifest.json" ] || $py train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml \
  "ode.teacher=$teacher" "ode.output_dir=$runs/ode_pairs" "${world[@]}"
[ -e "$runs/ode_init/model.safetensors" ] || $py train/ode_init.py --config_path configs/toy/ode_init.yaml --resume \
  "ode.teacher=$teacher" "ode.output_dir=$runs/ode_pairs" "train.output_dir=$runs/ode_init" "${world[@]}"

# name and overrides of each distillation variant: the toy HiAR recipe, and one change each
variants=(
  "hiar"
  "hiar_cfg1 distill.guidance_scale=1.0"
  "hiar_cfg4 distill.guidance_scale=4.0"
  "hiar_cfg6 distill.guidance_scale=6.0"
  "hiar_cfg9 distill.guidance_scale=9.0"
  "hiar_no_fkl distill.fkl_weight=0"
  "hiar_lr1e-5 train.lr=1e-5"
  "hiar_critic10 distill.dfake_gen_update_ratio=10"
  "hiar_t_max0.5 distill.t_max=0.5"
  "hiar_cfg6_x10 distill.guidance_scale=6.0 train.steps=4000"
)
names=(ode_init)
for line in "${variants[@]}"; do
  read -r name changes <<< "$line"
  names+=("$name")
  [ -e "$runs/$name/model.safetensors" ] || $py train/distill.py --config_path configs/toy/hiar.yaml --resume \
    "distill.generator=$runs/ode_init/model.safetensors" "distill.teacher=$teacher" "distill.critic=$teacher" \
    "ode.output_dir=$runs/ode_pairs" "train.output_dir=$runs/$name" train.sample_every=0 "${world[@]}" $changes
done

for name in "${names[@]}"; do
  [ -e "$runs/fidelity/$name/results.json" ] || $py -m eval.toy_fidelity --checkpoint "$runs/$name/model.safetensors" \
    --num_clips "$clips" --captions template held_out --out "$runs/fidelity/$name"
done

# one markdown row a model and caption set (the measures of eval.toy_results' prompt table), and every
# model's summaries without their per-clip lists in $runs/fidelity/summary.json
$py - "$runs/fidelity" "${names[@]}" <<'PY'
import json, sys
from eval.toy_results import PROMPT_MEASURES, prompt_measures
from hiar.report import percent
folder, names = sys.argv[1], sys.argv[2:]
summary = {}
print("| model | captions | " + " | ".join(PROMPT_MEASURES) + " | moving |")
print("| --- " * (len(PROMPT_MEASURES) + 3) + "|")
for name in names:
    by_captions = json.load(open(f"{folder}/{name}/results.json"))["by_captions"]
    summary[name] = {c: {k: v for k, v in s.items() if k != "per_clip"} for c, s in by_captions.items()}
    for captions, s in by_captions.items():
        m = prompt_measures(s)
        print(f"| {name} | {captions} | " + " | ".join(percent(m[k]) for k in PROMPT_MEASURES)
              + f" | {percent(s['moving'])} |")
with open(f"{folder}/summary.json", "w") as f:
    json.dump(summary, f, indent=1)
PY
