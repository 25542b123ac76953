#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct). Extra arguments go to `peftkit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec peftkit demo "$@"
