#!/usr/bin/env bash
# Sourced by the launch scripts: make .venv exist and match requirements.txt, with this repository
# installed in it in editable mode (reinstalls only when requirements.txt or pyproject.toml changed since
# the last successful install).
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  # (This machine's pip config names local mirrors that may be absent; drop pip's notes about them.)
  pip_install() {
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  }
  pip_install "$(grep -m1 '^torch==' requirements.txt)"
  pip_install -r requirements.txt
  pip_install --no-deps -e .  # hiar and inference importable from anywhere (pyproject.toml)
  echo "$want" > .venv/.requirements.sha256
fi
