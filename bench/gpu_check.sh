#!/usr/bin/env bash
# GPU readiness in one run (about 8 minutes at most on one H200): installs what is missing, runs the test suite's
# CUDA-marked tests (every fast path in bf16 against the unfused path) and the three benchmarks
# (bench/train.py, bench/serve.py, bench/nf4.py) with --device, and prints one table.
#
#   bench/gpu_check.sh [--device cuda|cpu] [--python PY]      (default: cuda; .venv/bin/python if present)
#   bench/gpu_check.sh --pack                                 (here, before a GPU run: see "Carrying" below)
#
# --device cpu runs the same parts at small sizes (the CUDA tests with PEFTKIT_TEST_DEVICE=cpu), so the
# script and the tests are exercised without a GPU. Each part has its own time limit; a part that fails or
# runs out of time is marked in the table and the others still run. Logs and JSON: $GPU_CHECK_LOGS
# (default /tmp/gpu_check). Exit status: 0 when every part passed, 1 otherwise, 2 for bad usage.
#
# Carrying: a GPU machine without network needs (a) the SmolLM2 tokenizer for bench/serve.py's tiny model:
# `bench/gpu_check.sh --pack` copies it (config and tokenizer files, no weights) into .gpu_assets/; add
# `/.gpu_assets/` to .git/info/exclude and carry that folder; (b) Python packages it lacks (bitsandbytes for
# nf4.py's comparison rows) as wheels in .whl/ (see the device notes), installed here with --no-index.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DEVICE=cuda
PY=""
PACK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 ;;
    --python) PY="${2:-}"; shift 2 ;;
    --pack) PACK=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (use --device cuda|cpu, --python PY, --pack)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
export PYTHONPATH="$ROOT/src:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [ "$PACK" = 1 ]; then
  src=$("$PY" -c "from peftkit.models import resolve_model_dir; print(resolve_model_dir('smollm2'))") || exit 1
  dst=.gpu_assets/peftkit-cache/models/SmolLM2-135M-Instruct
  mkdir -p "$dst" && for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
  done
  echo "packed $(du -sh .gpu_assets | cut -f1) into .gpu_assets/ (no weights); carry it: carry=[\".gpu_assets\"]"
  exit 0
fi

LOGS=${GPU_CHECK_LOGS:-/tmp/gpu_check}
rm -rf "$LOGS" && mkdir -p "$LOGS" || exit 2
: >"$LOGS/status.tsv"
START=$(date +%s)

# -- install what is missing -------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
missing=""
for m in torch transformers peft safetensors regex pytest; do "$PY" -c "import $m" 2>/dev/null || missing="$missing $m"; done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  timeout 120 "$PY" -m pip install -q --timeout 10 --retries 1 $missing \
    || { echo "gpu_check: cannot install$missing (no network? carry them as wheels in .whl/)" >&2; exit 1; }
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  timeout 60 "$PY" -m pip install -q --timeout 10 --retries 0 bitsandbytes 2>/dev/null \
    || echo "note: bitsandbytes not installed: bench/nf4.py skips its comparison rows (carry it in .whl/)"
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: --device cuda but torch sees no CUDA device (run with --device cpu for the CPU check)" >&2; exit 1
fi
if ! "$PY" -c "from peftkit.models import resolve_model_dir; resolve_model_dir('smollm2')" 2>/dev/null \
   && [ -d .gpu_assets/peftkit-cache ]; then
  export PEFTKIT_CACHE="$ROOT/.gpu_assets/peftkit-cache"
fi
"$PY" -c "import torch, transformers, peft, sys; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'
print(f'python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | {d} | cpu {torch.backends.cpu.get_cpu_capability()}')"

# -- the parts ------------------------------------------------------------------------------------------------
# part NAME LIMIT_S JSON COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome.
part() {
  local name=$1 limit=$2 result=$3; shift 3
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$LOGS/$name.log" "$result" >>"$LOGS/status.tsv"
  if [ "$rc" != 0 ]; then echo "   exit $rc; last lines of $LOGS/$name.log:"; tail -n 15 "$LOGS/$name.log" | sed 's/^/   | /'; fi
}
skip() {  # skip NAME REASON
  echo "$2" >"$LOGS/$1.log"
  printf '%s\tskip\t0\t%s\t-\n' "$1" "$LOGS/$1.log" >>"$LOGS/status.tsv"
}

mapfile -t cuda_tests < <(grep -rl --include='test_*.py' 'mark\.cuda' tests)
export PEFTKIT_TEST_DEVICE=$DEVICE  # tests/test_cuda.py runs on this device
part tests 150 "$LOGS/tests.xml" \
  "$PY" -m pytest -q -p no:cacheprovider -m cuda --junitxml="$LOGS/tests.xml" "${cuda_tests[@]}"

if [ "$DEVICE" = cuda ]; then
  TRAIN=(--models tiny --steps 10 --warmup 2 --mem-steps 1)
  SERVE=(--model tiny --requests 16 --max-tokens 16 --adapters 1,8 --rounds 2 --cold-loads 4 --swap-requests 4)
  NF4=(--rows quant,linear,fused --size 4096 --linear-size 4096 --repeats 5 --fused-shape smollm2 --fused-batch 8
       --fused-seq 512 --fused-repeats 5)
else
  TRAIN=(--quick)
  SERVE=(--quick)
  NF4=(--rows quant,linear,fused --size 512 --linear-size 512 --repeats 3 --fused-shape tiny --fused-batch 4
       --fused-seq 64 --fused-repeats 3)
fi
part train 120 "$LOGS/train.json" "$PY" bench/train.py --device "$DEVICE" "${TRAIN[@]}" --json "$LOGS/train.json"
if "$PY" -c "from peftkit.models import resolve_model_dir; resolve_model_dir('smollm2')" >/dev/null 2>&1; then
  part serve 120 "$LOGS/serve.json" "$PY" bench/serve.py --device "$DEVICE" "${SERVE[@]}" --json "$LOGS/serve.json"
else
  skip serve "no SmolLM2 tokenizer here (bench/serve.py's tiny model uses it): run --pack where it is, carry .gpu_assets"
fi
part nf4 150 "$LOGS/nf4.json" "$PY" bench/nf4.py --device "$DEVICE" "${NF4[@]}" --json "$LOGS/nf4.json"

"$PY" bench/gpu_check_table.py "$LOGS" "$DEVICE"
rc=$?
echo "total $(( $(date +%s) - START ))s; logs and JSON in $LOGS"
exit $rc
