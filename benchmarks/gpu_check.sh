#!/usr/bin/env bash
# Everything GPU-side in one call (fresh H100/H200, no network), each step time-boxed inside BUDGET seconds:
#   bash benchmarks/gpu_check.sh                  # -> benchmarks/results/{memory_tensor_gpu,gpu_train,gpu_check,clicks_gpu}.md
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # logic check of the latency script on CPU (tiny model)
# Packages the machine lacks travel as wheels in ./.whl (or WHEELS=dir), installed with pip --target (no index,
# no dependency resolution); without wheels the machine's own packages (or an installed medico-peft) are used.
# Results headers name the commit in ./.sent-commit (the copy's own git metadata was seen to lag). Before sending,
# from a clean tree: `git diff --quiet HEAD && git rev-parse HEAD > .sent-commit`; carry .whl and .sent-commit.
# Steps (STEPS="memory train latency clicks" by default, in that order; each killed at its cap or at the end of
# BUDGET seconds, reported, and the next one still runs). Costs measured on an H100 on 2026-11-27 (torch 2.11, the
# tree of d251d5f): start-up of every Python process there is ~15 s.
#   memory   bench_memory --gpu: tracker peak vs torch.cuda.max_memory_allocated; ~19 s per configuration (a fresh
#            process each): vit_b's 6 took 116 s, LiteMedSAM's 5 about 100 s (MEMORY_MODELS picks models);
#   train    gpu_train_check: CPU-vs-CUDA trainer parity (5 steps) + fp32/bf16/fp16 for 150 steps: ~45 s each, ~170 s;
#   latency  gpu_check: torch fp32 / bf16 / compile per model, TensorRT and onnxruntime-CUDA rows when installed
#            (else one skip row each, the ONNX export not run); LiteMedSAM's torch rows with compile ~100 s;
#   clicks   bench_clicks --device cuda on MNI152, 3 seeds of 100 steps: ~80 s a seed; the file is rewritten after
#            each seed.
# All four do not fit one 10-minute call: run STEPS="memory train latency" first, then STEPS=clicks on the warm
# machine (it stays warm 30 s after a call).
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
STEPS="${STEPS:-memory train latency clicks}"
wanted() { case " $STEPS " in *" $1 "*) return 0;; *) echo "=== $1: not asked for (STEPS=$STEPS)"; return 1;; esac; }
wanted memory && step memory 240 "$PY" benchmarks/bench_memory.py --gpu --models "${MEMORY_MODELS:-vit_b,litemedsam}" \
  --configs full,lora_qv_official,lora_qv,lora_qv_ckpt,lora_late_ckpt,decoder_cache --threads 4 \
  --out "$RESULTS/memory_tensor_gpu.md"
wanted train && step train 200 "$PY" -m benchmarks.gpu_train_check --steps 150 --out "$RESULTS/gpu_train.md"
wanted latency && step latency 300 "$PY" -m benchmarks.gpu_check --repeats 10 --out "$RESULTS/gpu_check.md"
wanted clicks && step clicks 600 "$PY" -m benchmarks.bench_clicks --device cuda --compression lzf --tasks mni152 --seeds 0 1 2 \
  --steps 100 --work /tmp/clicks_work --out "$RESULTS/clicks_gpu.md"
if [ -n "${OUT:-}" ]; then
  for f in memory_tensor_gpu gpu_train gpu_check clicks_gpu; do
    [ "$RESULTS/$f.md" -nt "$STAMP" ] && cp "$RESULTS/$f.md" "$OUT/"
  done
fi
echo "=== done in $(( $(date +%s) - START )) s"
