#!/usr/bin/env bash
# Everything to check on a GPU machine in one run (at most about 5 minutes on an H100-class GPU), with a JSON
# report: the tests marked `cuda`, bf16 vs float32 mask agreement, `dinov.tools.bench --device cuda` for Swin-T and
# Swin-L at 800x1333 batch 1 and 8, click latency with cached features, peak GPU memory.
#
#   bash scripts/gpu_check.sh [--out report.json]                  # default: MODEL_DIR/gpu_check.json
#   bash scripts/gpu_check.sh --dry-run [--out dry.json]      # the same steps on the CPU at small sizes (~1 min)
#
# Uses $PYTHON, else the project's .venv, else python3; installs nothing (a GPU machine may be offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 600 "$PYTHON" -m dinov.tools.gpu_check "$@"
