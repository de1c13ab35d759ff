#!/usr/bin/env bash
# The whole toy recipe on a CPU: teacher (three runs) -> ODE pairs -> ODE initialisation -> the distillation variants
# -> short-clip fidelity and long rollouts of every variant -> the table in docs/results.md.
#   bash launch/reproduce_toy.sh            # every stage; rerun after a crash to continue
#   VARIANTS="hiar self_forcing" bash launch/reproduce_toy.sh
#   SCALE=10 bash launch/reproduce_toy.sh   # variants trained 10x longer
# A stage whose output exists is skipped (training stages resume from their checkpoints, and the
# evaluation keeps the fidelity measurements it finished: eval.toy_results --resume; delete ROOT/results,
# or ROOT/x<N>/results, to measure afresh), and each stage's wall-clock is appended to
# runs/toy/timings.tsv (ROOT below). EVALUATE=0 skips the evaluation; DOC=FILE
# writes it into FILE (assets beside it) instead of docs/results.md, e.g. for a replicate run.
# SCALE=N multiplies the variants' training length (train.steps of configs/toy/<variant>.yaml) and puts
# them and their evaluation under runs/toy/x<N>/ (ROOT/x<N>/) and in docs/results.md's "<N>x" section; the teacher,
# ODE pairs and ODE initialisation are shared by every length, and a variant continues from the end of
# its longest finished shorter run (the same run, less compute: continue_shorter below). JOBS=N trains
# N variants at once with nproc/N threads each (default: one a core, at most one a variant; each logs to
# its own file): the toy model is too small to keep many threads busy, and on the 2-core VM two
# variants side by side on one thread each train 1.4x faster than one after the other on two
# (docs/results_v1.md, "The whole recipe in one go"). The choice and the evaluation run with the caller's
# OMP_NUM_THREADS (e.g. 1, beside another run), or all cores when it is unset.
# ROOT=DIR puts every stage under DIR instead of runs/toy (the configs' own paths), and OVERRIDES="K=V ..."
# passes config overrides to every stage and to the evaluation: another recipe from the same presets,
#   ROOT=runs/toy_2x2 OVERRIDES="model.patch_size=[1,2,2] sampling.stepping=sde" EVALUATE=0 bash launch/reproduce_toy.sh
# (the previous recipe, whose tables docs/results_v2.md holds). TEACHER=FILE starts from a trained teacher
# instead of training one (its three stages are then skipped), e.g. the shipped one,
# checkpoints/toy_teacher.safetensors, the last stage's (teacher_long.yaml). A first stage's teacher copied
# to ROOT/teacher/model.safetensors skips that stage alone (the one docs/results.md names).
# SELECT=N chooses each variant's checkpoint on validation clips: its training keeps one every N iterations
# (train.save_every=N train.keep_checkpoints=0), eval.toy_select chooses among them into
# <variant>/selected.safetensors, and the evaluation measures the chosen weights (the ODE initialisation's
# as they are) into <runs>/results_chosen and docs/results.md's "<N>x-chosen" section. The default's recipe:
#   TEACHER=checkpoints/toy_teacher.safetensors VARIANTS=hiar SCALE=2 SELECT=50 bash launch/reproduce_toy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
py=.venv/bin/python
variants=${VARIANTS:-"hiar self_forcing hiar_no_fkl hiar_ctx_current hiar_ctx_clean"}
scale=${SCALE:-1}
select_every=${SELECT:-0}
root=${ROOT:-runs/toy}
read -ra overrides <<< "${OVERRIDES:-}"
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the machine's, whatever threads the caller set
variant_count=$(wc -w <<< "$variants")
jobs=${JOBS:-$((cores < variant_count ? cores : variant_count))}
caller_threads=${OMP_NUM_THREADS-}  # the choice and the evaluation run with the caller's setting
runs=$root
[ "$scale" = 1 ] || runs=$root/x$scale
mkdir -p "$runs"

timed() {  # timed NAME SECONDS: one line of $root/timings.tsv
  printf '%s\t%s\t%d s\t%s\n' "$(date -u +%FT%TZ)" "$1" "$2" "$cores cores, ${OMP_NUM_THREADS:-$cores} threads" \
    >> "$root/timings.tsv"
}

stage() {  # stage NAME OUTPUT COMMAND...
  local name=$1 out=$2
  shift 2
  if [ -e "$out" ]; then
    echo "== $name: $out exists, skipped"
    return
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@" || return  # also where the caller tests the stage (set -e is off there)
  if [ ! -e "$out" ]; then  # a training stopped by SIGTERM saves a checkpoint and exits 0, unfinished
    echo "== $name: stopped before writing $out; rerun to continue" >&2
    return 1
  fi
  timed "$name" $((SECONDS - start))
}

copy_latest() {  # copy_latest FROM TO: the run in TO resumes (--resume) where the one in FROM finished
  mkdir -p "$2/checkpoints"
  cp -r "$1/checkpoints/$(cat "$1/checkpoints/latest")" "$1/checkpoints/latest" "$2/checkpoints/"
  cp "$1/metrics.jsonl" "$2/"
}

teacher=${TEACHER:-$root/teacher_long/model.safetensors}
if [ ! -e "$teacher" ] && [ -n "${TEACHER:-}" ]; then
  echo "TEACHER=$TEACHER: no such file" >&2
  exit 2
fi
if [ -z "${TEACHER:-}" ]; then  # the teacher in three runs, as the step-4000 one was made (configs/toy/teacher_long.yaml)
  stage teacher "$root/teacher/model.safetensors" $py train/teacher.py --config_path configs/toy/teacher.yaml \
    --resume "train.output_dir=$root/teacher" "${overrides[@]}"
  stage teacher_further "$root/teacher_further/model.safetensors" $py train/teacher.py \
    --config_path configs/toy/teacher_further.yaml --resume "train.init_weights=$root/teacher/model.safetensors" \
    "train.output_dir=$root/teacher_further" "${overrides[@]}"
  [ -e "$root/teacher_long/checkpoints/latest" ] || copy_latest "$root/teacher_further" "$root/teacher_long"
  stage teacher_long "$teacher" $py train/teacher.py --config_path configs/toy/teacher_long.yaml --resume \
    "train.init_weights=$root/teacher_further/model.safetensors" "train.output_dir=$root/teacher_long" \
    "${overrides[@]}"
fi
pairs=("ode.teacher=$teacher" "ode.output_dir=$root/ode_pairs")  # where the ODE stages read and write
stage ode_pairs "$root/ode_pairs/manifest.json" $py train/ode_pairs.py --config_path configs/toy/ode_pairs.yaml \
  "${pairs[@]}" "${overrides[@]}"
stage ode_init "$root/ode_init/model.safetensors" \
  $py train/ode_init.py --config_path configs/toy/ode_init.yaml --resume \
  "${pairs[@]}" "train.output_dir=$root/ode_init" "${overrides[@]}"

continue_shorter() {  # continue_shorter VARIANT: a longer run starts from the end of the longest finished
  # shorter run of the variant, not from scratch. At a constant learning rate every step draws from (seed,
  # step), so this is the run from scratch (tests/test_distill.py resumes a 2-step run to 3 steps); with
  # train.decay_steps the rate depends on the length and the run starts over.
  local length dir
  [ ! -e "$runs/$1/checkpoints/latest" ] && [ "$decay" = 0 ] || return 0
  for length in $( (echo 1; ls -d "$root"/x*/ 2>/dev/null | sed 's|.*/x\([0-9]*\)/$|\1|') | sort -rn); do
    [ "$length" -lt "$scale" ] || continue
    dir=$root; [ "$length" = 1 ] || dir=$root/x$length
    [ -e "$dir/$1/model.safetensors" ] || continue
    echo "== $1 (${scale}x): continues $dir/$1 ($(cat "$dir/$1/checkpoints/latest"))"
    copy_latest "$dir/$1" "$runs/$1"
    return 0
  done
}

distill() {  # distill VARIANT: its config's training length times $scale, under $runs (log: $runs/VARIANT.log
  local config=configs/toy/$1.yaml params steps decay   # when several train at once)
  params=$($py -c "import sys; from hiar.config import load_config; t = load_config(sys.argv[1]).train
print(t.steps, t.decay_steps)" "$config")
  read -r steps decay <<< "$params"
  [ -e "$runs/$1/model.safetensors" ] || continue_shorter "$1"
  local kept=()  # SELECT: every checkpoint eval.toy_select chooses among
  [ "$select_every" = 0 ] || kept=("train.save_every=$select_every" "train.keep_checkpoints=0")
  local run=(stage "$1 (${scale}x)" "$runs/$1/model.safetensors" $py train/distill.py --config_path "$config" --resume
             "train.output_dir=$runs/$1" "train.steps=$((steps * scale))"
             "distill.generator=$root/ode_init/model.safetensors"
             "distill.teacher=$teacher" "distill.critic=$teacher" "ode.output_dir=$root/ode_pairs" "${kept[@]}"
             "${overrides[@]}")
  if [ "$jobs" = 1 ] || [ -e "$runs/$1/model.safetensors" ]; then
    "${run[@]}"
    return
  fi
  echo "== $1 (${scale}x): training, log $runs/$1.log"
  if ! "${run[@]}" >> "$runs/$1.log" 2>&1; then  # appended: a resumed run keeps the earlier log
    echo "== $1 (${scale}x): stopped, see $runs/$1.log" >&2
    return 1
  fi
  echo "== $1 (${scale}x): done"
}
[ "$jobs" = 1 ] || export OMP_NUM_THREADS=$((cores / jobs > 0 ? cores / jobs : 1))
pids=()
for variant in $variants; do
  distill "$variant" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done  # a failed variant stops the script (set -e)
done
for pid in "${pids[@]}"; do wait "$pid"; done
if [ -n "$caller_threads" ]; then export OMP_NUM_THREADS=$caller_threads; else unset OMP_NUM_THREADS; fi
chosen=()  # what the evaluation measures and where it writes, the chosen weights with SELECT
label=${scale}x results=$runs/results
if [ "$select_every" != 0 ]; then
  for variant in $variants; do
    stage "$variant (${scale}x): choice" "$runs/$variant/selected.safetensors" $py -m eval.toy_select \
      --run "$runs/$variant" --every "$select_every" --export "$runs/$variant/selected.safetensors" "${overrides[@]}"
  done
  chosen=(--weights selected.safetensors) label=${scale}x-chosen results=$runs/results_chosen
fi
if [ "${EVALUATE:-1}" = 1 ]; then
  start=$SECONDS
  $py -m eval.toy_results --runs "$runs" --out "$results" --doc "${DOC:-docs/results.md}" --label "$label" --resume \
    "${chosen[@]}" "${overrides[@]}"
  timed "evaluation ($label)" $((SECONDS - start))
fi
# The whole invocation, setup included: the figure docs/results.md quotes for a run from a fresh clone.
timed "whole script (${scale}x)" "$SECONDS"
