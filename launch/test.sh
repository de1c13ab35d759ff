#!/usr/bin/env bash
# The test command: create or reuse .venv in the repo, install the pinned requirements, run pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k cache`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
# Two pytest workers (pytest-xdist) of one thread each: most of the suite is single-threaded work and process
# start-ups (`import torch` alone takes 2-3 s on the 2-core VM without AVX512), so on that VM two workers run
# it in about 9 minutes where one process of two threads takes 14. TEST_WORKERS=0: one process, all cores.
workers=${TEST_WORKERS:-2}
if [ "$workers" != 0 ]; then
  export OMP_NUM_THREADS=1  # two processes of two threads on two cores stall each other at every OpenMP barrier
fi
exec .venv/bin/python -m pytest tests -n "$workers" "$@"
