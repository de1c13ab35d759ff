#!/usr/bin/env bash
# VBench on a folder of videos, in its own virtual environment, read back into our report.
#
#   bash launch/vbench.sh VIDEOS OUT [DIMENSION ...]      (default dimension: temporal_flickering)
#   bash launch/vbench.sh runs/eval/toy/videos runs/eval/toy/vbench temporal_flickering
#
# VBench pins transformers 4.33, numpy < 2 and a torch of its own, so it cannot share .venv: the first
# run creates $VBENCH_VENV (default .venv-vbench) with vbench==0.1.5 and $VBENCH_TORCH (default
# torch==2.1.2 torchvision==0.16.2: a multi-GB CUDA download from PyPI), and marks it ready only when
# both installed. Then:
#   1. our .venv cuts the videos into VBench-Long's 2 s clips:  OUT/clips/<method>/  (eval/vbench.py)
#   2. VBench scores each method's clips in custom_input mode:  OUT/results/<method>/*_eval_results.json
#   3. our .venv reads the scores back:                          OUT/vbench.json (eval.report picks up
#      <run>/vbench/vbench.json)
# VBench's own CLI (`vbench evaluate`) always initialises NCCL on CUDA, so step 2 calls its Python API
# (VBench(...).evaluate(..., mode="custom_input")), which runs on CPU too. Weights of the dimensions that
# need them are read from $VBENCH_CACHE_DIR (default wan_models/vbench_cache, VBench's own variable) and
# never downloaded here: offline, only temporal_flickering (no weights) runs.
# Environment: HIAR_PYTHON (our interpreter, default .venv/bin/python), CLIP_SECONDS (default 2).
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
venv=${VBENCH_VENV:-.venv-vbench}
python=${HIAR_PYTHON:-.venv/bin/python}
export VBENCH_CACHE_DIR=${VBENCH_CACHE_DIR:-$PWD/wan_models/vbench_cache}
if [ ! -d "$videos" ]; then
  echo "error: video folder $videos does not exist" >&2
  exit 2
fi

if [ ! -f "$venv/.vbench-ready" ]; then
  echo "creating $venv (vbench==0.1.5 and ${VBENCH_TORCH:-torch==2.1.2 torchvision==0.16.2}; several GB)" >&2
  base=${PYTHON:-$(command -v python3.11 || command -v python3)}
  [ -x "$venv/bin/python" ] || "$base" -m venv "$venv"
  # torch first, pinned: vbench does not name one, and its dependencies would pull the newest
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${VBENCH_TORCH:-torch==2.1.2 torchvision==0.16.2}
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check vbench==0.1.5
  # pip can succeed with a torchvision whose compiled ops do not match torch: prove the import first
  if ! "$venv/bin/python" -c "import vbench.utils" >&2; then
    echo "error: vbench does not import in $venv (torch / torchvision mismatch?); set VBENCH_TORCH and delete $venv" >&2
    exit 1
  fi
  touch "$venv/.vbench-ready"
fi

"$python" -m eval.vbench clips --videos "$videos" --out "$out/clips" --clip_seconds "${CLIP_SECONDS:-2}"
name=results_$(date +%Y%m%d-%H%M%S)
for dir in "$out"/clips/*/; do
  method=$(basename "$dir")
  echo "VBench ${dims[*]} on $method" >&2
  "$venv/bin/python" - "$dir" "$out/results/$method" "$name" "${dims[@]}" <<'EOF'
import json, sys
import torch
from vbench import VBench

clips, results, name, *dims = sys.argv[1:]
prompts = json.load(open(f"{clips}/prompts.json"))  # {clip file: prompt}, VBench's --prompt_file format
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VBench(device, "", results).evaluate(videos_path=clips, name=name, prompt_list=prompts, dimension_list=dims,
                                     local=True, mode="custom_input")
EOF
done
"$python" -m eval.vbench read --clips "$out/clips" --results "$out/results" --out "$out/vbench.json" \
  --clip_seconds "${CLIP_SECONDS:-2}"
