#!/usr/bin/env bash
# Everything GPU-side in one call (fresh H100/H200, no network), each step time-boxed inside BUDGET seconds:
#   bash benchmarks/gpu_check.sh                  # -> benchmarks/results/{memory_tensor_gpu,gpu_train,gpu_check,clicks_gpu}.md
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # logic check of the latency script on CPU (tiny model)
# Packages the machine lacks travel as wheels in ./.whl (or WHEELS=dir), installed with pip --target (no index,
# no dependency resolution); without wheels the machine's own packages (or an installed medico-peft) are used.
# The commit the copy was made from is read from ./.sent-commit when the copy has no git (results headers).
# Steps, most important first (a step that runs out of time is killed and reported; the rest still run):
#   1. bench_memory --gpu: tracker peak vs torch.cuda.max_memory_allocated per method (vit_b 1024², LiteMedSAM);
#   2. gpu_train_check: CPU-vs-CUDA trainer parity; fp32 / bf16 / fp16 training on real data;
#   3. gpu_check: torch fp32 / bf16 / compile, onnxruntime, TensorRT (skipped with the reason when absent):
#      encoder, decoder and end-to-end latency and parity, volume path, semantic export;
#   4. bench_clicks --device cuda on MNI152, 3 seeds of 100 steps (the CPU run: one of 40), with what time is
#      left: the file is rewritten after each seed.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET="${BUDGET:-560}"
START=$(date +%s)
STAMP=$(mktemp); touch "$STAMP"  # results written after this are this run's
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
RESULTS="${RESULTS:-benchmarks/results}"
if [ -d .venv ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ "${1:-}" = "--cpu-dry-run" ]; then
  exec "$PY" -m benchmarks.gpu_check --cpu-dry-run --out /tmp/gpu_check_dry.md
fi
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# export/ installs as medico_peft.export; without an install, a link makes the source tree importable.
if ! "$PY" -c "import medico_peft.export" 2>/dev/null; then
  [ -e medico_peft/export ] || ln -s ../export medico_peft/export
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -f .sent-commit ] && export MEDICO_PEFT_SENT_COMMIT="$(cat .sent-commit)"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'PY'
import importlib
for m in ("torch", "onnx", "onnxruntime", "tensorrt", "peft", "medico_peft.export"):
    try:
        mod = importlib.import_module(m); print(f"{m} {getattr(mod, '__version__', 'ok')}")
    except ImportError as exc:
        print(f"{m}: not available ({exc})")
PY

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME CAP command...: run with a limit of min(CAP, time left), report how it ended
  local name=$1 cap=$2; shift 2
  local t=$(left); [ "$cap" -lt "$t" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "=== $name: not run (${t} s left of the ${BUDGET} s budget)"; return; fi
  echo "=== $name (limit ${t} s): $*"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$t" "$@"
  local rc=$?
  echo "=== $name: rc $rc after $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (time limit: killed)')"
}
step memory 150 "$PY" benchmarks/bench_memory.py --gpu --models vit_b,litemedsam \
  --configs full,lora_qv_official,lora_qv,lora_qv_ckpt,lora_late_ckpt,decoder_cache --threads 4 \
  --out "$RESULTS/memory_tensor_gpu.md"
step train 110 "$PY" -m benchmarks.gpu_train_check --steps 150 --out "$RESULTS/gpu_train.md"
step latency 200 "$PY" -m benchmarks.gpu_check --repeats 10 --out "$RESULTS/gpu_check.md"
step clicks 600 "$PY" -m benchmarks.bench_clicks --device cuda --compression lzf --tasks mni152 --seeds 0 1 2 \
  --steps 100 --work /tmp/clicks_work --out "$RESULTS/clicks_gpu.md"
if [ -n "${OUT:-}" ]; then
  for f in memory_tensor_gpu gpu_train gpu_check clicks_gpu; do
    [ "$RESULTS/$f.md" -nt "$STAMP" ] && cp "$RESULTS/$f.md" "$OUT/"
  done
fi
echo "=== done in $(( $(date +%s) - START )) s"
