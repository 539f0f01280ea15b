#!/usr/bin/env bash
# The one command to run on a GPU machine (at most 8 minutes on one H100/H200; stops itself):
#   bash lab/gpu_check.sh [OUT_DIR]        # default results/gpu_check
# It runs with the machine's own python3 (PYTHON=/path/to/python to pick another), no uv sync:
# hydra-core, omegaconf and antlr4 come from .whl/ when that python lacks them (fetch them first
# with lab/gpu_wheels.sh on a machine with PyPI). What it runs and writes: docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-results/gpu_check}
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}

fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no $PY on PATH: set PYTHON=/path/to/python3"
"$PY" -c "
import sys
try:
    import torch
except Exception:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)" 2>/dev/null
case $? in
  0) ;;
  3) fail "$PY cannot import torch: run with a python that has PyTorch (PYTHON=/path/to/python3)" ;;
  4) fail "no CUDA device (torch.cuda.is_available() is False): run this on a machine with an NVIDIA GPU" ;;
  *) fail "$PY failed while checking for torch and CUDA" ;;
esac

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 ||
    fail "hydra-core/omegaconf are missing and .whl/ holds no wheels: run lab/gpu_wheels.sh where PyPI is reachable and bring .whl/ along"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || fail "installing .whl/*.whl into /tmp/site failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import hydra, omegaconf" 2>/dev/null || fail "hydra still not importable from /tmp/site"
fi

mkdir -p "$OUT_DIR" || fail "cannot create $OUT_DIR"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
# the Python driver keeps its own deadline a little inside this one and writes what it has
timeout --signal=INT --kill-after=20 "$LIMIT_S" "$PY" lab/gpu_check.py "$OUT_DIR" "$LIMIT_S"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped at the ${LIMIT_S}s limit; partial results in $OUT_DIR" >&2
exit $rc
