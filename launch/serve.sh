#!/usr/bin/env bash
# The live demo: set up .venv if needed, then serve the page on http://127.0.0.1:8000 with the embedded
# toy default on the CPU (docs/demo.md). Arguments go to serve.py (e.g. --port 8080, or a Wan config
# and checkpoint on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec .venv/bin/python serve.py "$@"
