#!/usr/bin/env bash
# One command for a fresh GPU machine (H100/H200), no network needed:
#   bash benchmarks/gpu_check.sh              # installs from ./wheels (or WHEELS=dir) if given, then checks
#   bash benchmarks/gpu_check.sh --cpu-dry-run
# Installs the package and its export extra from wheels carried in $WHEELS (pip --no-index), or uses
# what the machine already has; tensorrt is installed too when its wheel is in $WHEELS.
# Budget: ~9 min on one GPU (litemedsam + vit_b, fp32/fp16/bf16 engines, 20 repeats; then the semantic
# export of litemedsam with a class head: ONNX + three engines).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
if [ -d .venv ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e ".[export]" || \
    "$PY" -m pip install -q --no-index --no-deps -e . 
  ls "$WHEELS" | grep -qi '^tensorrt' && "$PY" -m pip install -q --no-index --find-links "$WHEELS" tensorrt || true
  ls "$WHEELS" | grep -qi '^onnxruntime_gpu' && "$PY" -m pip install -q --no-index --find-links "$WHEELS" onnxruntime-gpu || true
else
  "$PY" -c "import medico_peft" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
"$PY" - <<'PY'
import importlib
for m in ("torch", "onnx", "onnxruntime", "tensorrt"):
    try:
        mod = importlib.import_module(m); print(f"{m} {getattr(mod, '__version__', '?')}")
    except ImportError as exc:
        print(f"{m}: not available ({exc})")
PY
exec timeout 540 "$PY" -m benchmarks.gpu_check --out benchmarks/results/gpu_check.md "$@"
