#!/usr/bin/env bash
# The first command of the README: set up .venv if needed, then generate a toy video on the CPU with
# the embedded default student (configs/toy/hiar.yaml, runtime.checkpoint). Arguments go to inference.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec .venv/bin/python inference.py "$@"
