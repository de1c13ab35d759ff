#!/usr/bin/env bash
# Sourced by the launch scripts: make .venv exist and match requirements.txt (reinstalls only when
# requirements.txt changed since the last successful install).
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  # (This machine's pip config names local mirrors that may be absent; drop pip's notes about them.)
  pip_install() {
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  }
  pip_install "$(grep -m1 '^torch==' requirements.txt)"
  pip_install -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi
