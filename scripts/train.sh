#!/usr/bin/env bash
# The main job: fine-tune the embedded default model (SmolLM2-135M-Instruct) with LoRA on the built-in task
# (support tickets to strict JSON records) and show the result. Extra arguments go to `peftkit train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec peftkit train "$@"
