#!/usr/bin/env bash
# Set up FreeFuse in ./.venv: Python check, PyTorch (a CPU build unless an NVIDIA GPU is present),
# then the package with its dev extras. Safe to run again: it only reinstalls when pyproject.toml changed.
#
#   PYTHON=python3.11 ./scripts/setup.sh     # pick the interpreter
#   FREEFUSE_TORCH="torch==2.13.0"           # the torch to install when none is present
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${FREEFUSE_VENV:-.venv}"
TORCH_SPEC="${FREEFUSE_TORCH:-torch==2.13.0}"
say() { printf '[setup] %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  say "FreeFuse needs Python >= 3.10; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing). Set PYTHON=..."
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp="$VENV/.freefuse-installed"
want="$(cat pyproject.toml scripts/setup.sh | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import torch, freefuse' 2>/dev/null; then
  exit 0
fi

# PyTorch first: asked for later by another package, pip would pick a multi-GB CUDA build.
if ! "$PY" -W ignore -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing $TORCH_SPEC (CUDA build)"
    "${PIP[@]}" install "$TORCH_SPEC"
  else
    say "no GPU: installing $TORCH_SPEC (CPU build)"
    # The CPU wheel index when it can be reached; otherwise the configured index (a local CPU wheel here).
    "${PIP[@]}" install --retries 0 --timeout 15 --index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC" 2>/dev/null \
      || "${PIP[@]}" install "$TORCH_SPEC"
    if "$PY" -W ignore -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
      say "warning: a CUDA build of torch was installed on a machine without a GPU (it still runs on the CPU)."
    fi
  fi
fi

say "installing freefuse and its dependencies"
"${PIP[@]}" install -e ".[dev]"
echo "$want" > "$stamp"
say "ready: $VENV/bin/freefuse"
