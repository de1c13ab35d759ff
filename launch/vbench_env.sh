#!/usr/bin/env bash
# Sourced by launch/vbench.sh: make VBench's own environment, $VBENCH_VENV (default .venv-vbench), exist
# and match requirements-vbench.txt (the pins and why they are what they are: that file). Reused as it is
# while its stamp (the sha256 of requirements-vbench.txt and the interpreter's version) matches; rebuilt
# in place (pip installs only what changed) otherwise. Sets vbench_python.
#
# The environment is marked ready only after launch/vbench_worker.py check has imported vbench and run
# torchvision's compiled nms: pip can succeed with a torchvision built against another torch, which
# imports and then fails ("operator torchvision::nms does not exist").
vbench_venv=${VBENCH_VENV:-.venv-vbench}
vbench_python=$vbench_venv/bin/python
vbench_base=${PYTHON:-$(command -v python3.11 || command -v python3)}
# The environment is rebuilt when its requirements or its Python change.
vbench_want=$( { cat requirements-vbench.txt; "$vbench_base" -c 'import sys; print(sys.version)'; } \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$vbench_venv/.vbench-ready" 2>/dev/null)" != "$vbench_want" ]; then
  echo "building $vbench_venv from requirements-vbench.txt (about 2 minutes and 6 GB the first time)" >&2
  [ -x "$vbench_python" ] || "$vbench_base" -m venv "$vbench_venv"
  rm -f "$vbench_venv/.vbench-ready"
  # (This machine's pip config names local mirrors that may be absent; drop pip's notes about them.)
  "$vbench_python" -m pip install --quiet --disable-pip-version-check -r requirements-vbench.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  if ! "$vbench_python" launch/vbench_worker.py check >&2; then
    echo "error: VBench does not work in $vbench_venv (see above); delete it and run again" >&2
    exit 1
  fi
  echo "$vbench_want" > "$vbench_venv/.vbench-ready"
fi
