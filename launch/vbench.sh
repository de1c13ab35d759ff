#!/usr/bin/env bash
# VBench / VBench-Long on a folder of videos, in VBench's own environment, read back into our report.
#
#   bash launch/vbench.sh VIDEOS OUT [DIMENSION ...]      (default dimension: temporal_flickering)
#   bash launch/vbench.sh runs/eval/toy/videos runs/eval/toy/vbench temporal_flickering
#   python -m eval.vbench run ...                         (generates the videos first, then this)
#
# 0. launch/vbench_env.sh makes $VBENCH_VENV (default .venv-vbench) match requirements-vbench.txt (the
#    pins and why: that file; about 2 minutes and 6 GB the first time), or reuses it.
# 1. with SCENE_SPLIT=1, VBench-Long's scene split (PySceneDetect, in that environment): OUT/scenes.json
# 2. our .venv cuts VBench-Long's clips and plans the dimensions:     OUT/clips/<method>/, OUT/clips/plan.json
#    A dimension whose weights are not in $VBENCH_CACHE_DIR (default wan_models/vbench_cache) is skipped,
#    saying which file it needs; VBENCH_DOWNLOAD=1 lets VBench fetch them itself (nothing else downloads).
#    Offline, only temporal_flickering (no weights) runs.
# 3. VBench's own compute_<dimension> scores the clips:               OUT/results/<method>/*_eval_results.json
# 4. our .venv aggregates as VBench-Long does:  OUT/vbench.json, OUT/vbench.md (beside the paper's numbers),
#    OUT/leaderboard/<method>_eval_results.json (VBench's format); eval.report picks up <run>/vbench/vbench.json
# Environment: HIAR_PYTHON (our interpreter, default .venv/bin/python), CLIP_SECONDS (one clip length for
# every video instead of VBench-Long's), SCENE_THRESHOLD (default 35, VBench-Long's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash launch/vbench.sh VIDEOS OUT [DIMENSION ...]" >&2
  exit 2
fi
videos=$1
out=$2
shift 2
dims=("$@")
[ ${#dims[@]} -gt 0 ] || dims=(temporal_flickering)
python=${HIAR_PYTHON:-.venv/bin/python}
export VBENCH_CACHE_DIR=${VBENCH_CACHE_DIR:-$PWD/wan_models/vbench_cache}
if [ ! -d "$videos" ]; then
  echo "error: video folder $videos does not exist" >&2
  exit 2
fi
# shellcheck source=launch/vbench_env.sh
source launch/vbench_env.sh  # sets $vbench_python
mkdir -p "$out"

extra=()
if [ "${SCENE_SPLIT:-0}" = 1 ]; then
  "$vbench_python" launch/vbench_worker.py scenes "$videos" "$out/scenes.json" "${SCENE_THRESHOLD:-35}"
  extra+=(--scenes "$out/scenes.json")
fi
[ -z "${CLIP_SECONDS:-}" ] || extra+=(--clip_seconds "$CLIP_SECONDS")
[ "${VBENCH_DOWNLOAD:-0}" != 1 ] || extra+=(--download)
"$python" -m eval.vbench clips --videos "$videos" --out "$out/clips" --dimensions "${dims[@]}" \
  --cache_dir "$VBENCH_CACHE_DIR" --full_info "$("$vbench_python" launch/vbench_worker.py full_info)" "${extra[@]}"
runnable=$("$python" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["run"]))' "$out/clips/plan.json")
if [ "$runnable" = 0 ]; then
  echo "error: none of the dimensions ${dims[*]} can run here (reasons above)" >&2
  exit 1
fi

name=results_$(date +%Y%m%d-%H%M%S)
for info in "$out"/clips/*/vbench_info.json; do
  method=$(basename "$(dirname "$info")")
  if [ "$(tr -d '[:space:]' < "$info")" = "[]" ]; then
    echo "VBench: nothing to score for $method (no video's prompt fits the dimensions that run)" >&2
    continue
  fi
  echo "VBench on $method" >&2
  "$vbench_python" launch/vbench_worker.py score "$info" "$out/results/$method" "$name"
done
"$python" -m eval.vbench read --clips "$out/clips" --results "$out/results" --out "$out/vbench.json"
