#!/usr/bin/env bash
# The test command: create or reuse .venv in the repo, install the pinned requirements, run pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k cache`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec .venv/bin/python -m pytest tests "$@"
