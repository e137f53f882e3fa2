#!/usr/bin/env bash
# The one-shot GPU check: bench/gpu.sh OUT_DIR [extra bench/gpu.py options, e.g. --dry-run]
#
# Installs nothing beyond the project's own requirements (and only when an import is
# missing), points MINLM_DATA_DIR at the shared data when it is found, and writes everything
# (results.json, results.csv, loss_curve.png, runs/, log.txt) under OUT_DIR. A hard outer
# timeout backs up the script's own limit.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bench/gpu.sh OUT_DIR [bench/gpu.py options]" >&2
  exit 2
fi
out=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
py=${PYTHON:-python3}

if ! "$py" -c "import torch, sentencepiece, safetensors, pandas, matplotlib, tqdm" 2>/dev/null; then
  echo "installing requirements.txt" >&2
  "$py" -m pip install -q -r requirements.txt || echo "pip install failed; going on" >&2
fi
if ! "$py" -c "import transformers" 2>/dev/null; then  # for the comparison rows only
  echo "installing requirements-dev.txt" >&2
  "$py" -m pip install -q -r requirements-dev.txt || echo "pip install failed; the transformers rows will say so" >&2
fi

if [ -z "${MINLM_DATA_DIR:-}" ]; then
  for d in "$root/shared/data" "$root/../shared/data" "$root/data"; do
    if [ -f "$d/tinystories/train.txt" ]; then
      export MINLM_DATA_DIR=$(cd "$d" && pwd)
      break
    fi
  done
fi
echo "data: ${MINLM_DATA_DIR:-none found (the training rows will fall back or fail)}" >&2

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# the script stops itself at --limit-minutes (8); this outer limit only catches a hang
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-600}" "$py" bench/gpu.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
