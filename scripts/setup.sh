#!/usr/bin/env bash
# Set up moebench's environment and print the Python to use.
#  - Inside an active virtualenv/conda env: use it as is.
#  - Otherwise: create ./.venv (once).
# torch: an existing install is kept. Only when torch is missing do we ask for 2.13.0 first
# (these machines carry that CPU wheel locally: seconds instead of a multi-GB CUDA download),
# falling back to the newest torch where that pin is not available.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  py=$(command -v python)
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv >&2
  fi
  py=.venv/bin/python
fi

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch (CPU wheel 2.13.0 where available)" >&2
  "$py" -m pip install --quiet "torch==2.13.0" >&2 || "$py" -m pip install --quiet torch >&2
fi

# Editable install with test extras, redone when pyproject.toml changes.
marker=""
[ "$py" = .venv/bin/python ] && marker=.venv/.moebench-installed
need=0
"$py" -c "import importlib.metadata as m; m.version('moebench'); import pytest, hypothesis, pytest_benchmark, jsonschema, safetensors, transformers" \
  >/dev/null 2>&1 || need=1
if [ -n "$marker" ] && { [ ! -e "$marker" ] || [ pyproject.toml -nt "$marker" ]; }; then need=1; fi
if [ "$need" = 1 ]; then
  echo "setup: installing moebench and its dependencies" >&2
  "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]" >&2
  if [ -n "$marker" ]; then touch "$marker"; fi
fi
echo "$py"
