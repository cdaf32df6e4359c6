"""Training step time: LoRA / full finetune side by side, and what the decoder fixes saved (before vs after).

Three fixes are measured, all on by default in the library:
- subnormal gradients flushed at the logits (`models.sam.flush_subnormal_grads`): sigmoid' of large
  negative logits underflows, and x86 arithmetic on subnormals is ~100× slower;
- `OMP_WAIT_POLICY=PASSIVE` set by `import medico_peft` (idle OpenMP threads sleep instead of spinning,
  which on a shared CPU made every small op wait for a descheduled thread);
- the eager mask decoder (`models/mask_decoding.py`: contiguous image tokens, SDPA decoder attention,
  channels-last upscaling as matmuls) instead of segment_anything's modules as they are.
*before* runs with all three off (`MEDICO_PEFT_OMP_DEFAULTS=0`, `FLUSH_SUBNORMAL_GRADS=False`,
`mask_decoding.FAST_EAGER=False`), *after* with all on.
Each (variant, round) is a fresh subprocess (the wait policy is fixed when torch loads); rounds alternate
before/after so load changes hit both. Inside one process LoRA and full steps alternate (interleaved), and
the ratio is the median of per-pair ratios. The decoder latency row compares torch eager (`MedSam.decode`,
no grad) with onnxruntime on the same exported decoder graph and inputs, interleaved in one process.

Configurations (every object valid, fixed synthetic batch, AdamW, per-iteration backward as the trainer):
- demo recipe: LiteMedSAM, LoRA q,v on the last 2 blocks + decoder + prompt encoder, feature cache,
  batch 2 × 2 objects, as many click sub-iterations as `medico-peft demo` trains (read from
  `workflows.demo.CLICK_TRAINING`);
- LiteMedSAM 256²: LoRA q,v (all blocks) vs full, batch 2 × 2 objects, 3 sub-iterations;
- vit_b 512²: LoRA q,v (all blocks) vs full, batch 1 × 3 objects, 3 sub-iterations (random weights: timing only).
CPU budget: about 10-15 min of 2-core time on a quiet machine with the defaults (2 rounds × 2 variants).

    nice -n 10 python benchmarks/bench_step_time.py            # -> benchmarks/results/step_time.md
    python benchmarks/bench_step_time.py --rounds 1 --repeats 1 --configs demo --out /tmp/s.md   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch, on purpose: `import medico_peft` sets the *after* variant's OMP_WAIT_POLICY, and OpenMP reads it
# once, when torch loads it. (Until c41309f the worker imported torch first, so *after* ran with OpenMP's default
# spin count: OMP_DISPLAY_ENV=VERBOSE shows GOMP_SPINCOUNT unchanged.) Imports no torch itself.
from medico_peft.workflows.demo import CLICK_TRAINING

try:
    from benchmarks._results import Results
except ImportError:  # run as `python benchmarks/bench_step_time.py`
    from _results import Results

CONFIGS = {
    "demo": dict(model="litemedsam", methods=["demo"], batch=2, objects=2,
                 sub_iterations=CLICK_TRAINING["sub_iterations"]),
    "litemedsam": dict(model="litemedsam", methods=["lora_qv", "full"], batch=2, objects=2, sub_iterations=3),
    "vit_b": dict(model="vit_b", img_size=512, methods=["lora_qv", "full"], batch=1, objects=3, sub_iterations=3),
}
GOAL_DECODER = 2.0  # torch decoder time / onnxruntime decoder time
GOAL_RATIO = 0.7  # LoRA step / full step
GOAL_DEMO = 0.5  # demo step after / before


def worker(args) -> None:
    # what OpenMP reads when torch loads it just below (nothing, if something loaded torch already)
    policy = "(torch loaded before)" if "torch" in sys.modules else os.environ.get("OMP_WAIT_POLICY", "(unset)")
    import torch

    import medico_peft.models.mask_decoding as mask_decoding
    import medico_peft.models.sam as sam

    torch.set_num_threads(args.threads)
    sam.FLUSH_SUBNORMAL_GRADS = args.variant == "after"
    mask_decoding.FAST_EAGER = args.variant == "after"
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from _step import build

    from medico_peft.workflows.demo import demo_peft_config  # the demo's own PeftConfig, as `demo` builds it

    out = {"variant": args.variant, "omp_wait_policy": policy}
    if args.worker_config == "decoder":
        out.update(decoder_latency(args))
    else:
        cfg = CONFIGS[args.worker_config]
        rigs = {}
        for method in cfg["methods"]:
            kw = dict(img_size=cfg.get("img_size"), batch=cfg["batch"], objects=cfg["objects"],
                      sub_iterations=cfg["sub_iterations"])
            if method == "demo":
                rigs[method] = build(cfg["model"], "lora_qv", cache=True,
                                     peft_overrides=demo_peft_config(blocks=2).to_dict(), **kw)
            else:
                rigs[method] = build(cfg["model"], method, **kw)
        times = {m: [] for m in rigs}
        for i in range(args.warmup + args.repeats):  # interleaved: every repeat runs each method once
            for m, rig in rigs.items():
                t0 = time.perf_counter()
                rig.step()
                if i >= args.warmup:
                    times[m].append(time.perf_counter() - t0)
        out["times"] = times
    print(json.dumps(out))


def decoder_latency(args) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from medico_peft.models import load_model
    from medico_peft.runtime.ort_backend import decoder_feed
    from medico_peft.runtime.preprocess import build_prompt_arrays
    from medico_peft.runtime.torch_backend import torch_decode

    model = load_model("litemedsam").eval()
    s = model.img_size
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(Path(args.onnx_dir) / "decoder.onnx"), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.encode(torch.rand(1, 3, s, s, generator=gen))
    coords, labels = build_prompt_arrays((s, s), box=[40, 50, 150, 170])
    feed = decoder_feed(emb, coords, labels, None, 0.0, (s, s), model.spec.embedding_size)
    t_torch, t_ort = [], []
    with torch.no_grad():
        for i in range(2 + args.repeats * 5):
            t0 = time.perf_counter()
            torch_decode(model, emb, coords, labels, None, 0.0, (s, s), False)
            t1 = time.perf_counter()
            sess.run(None, feed)
            t2 = time.perf_counter()
            if i >= 2:
                t_torch.append(t1 - t0)
                t_ort.append(t2 - t1)
    return {"times": {"torch": t_torch, "ort": t_ort}}


def export_decoder(work: Path) -> Path:
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.models import load_model

    out = work / "litemedsam_onnx"
    export_onnx(load_model("litemedsam"), out, parity_random=1, parity_real=0, threads=2)
    return out


def run(args) -> list[dict]:
    rows = []
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = export_decoder(Path(tmp)) if "decoder" in configs else None
        for rnd in range(args.rounds):
            for config in configs:
                for variant in ("before", "after"):
                    env = dict(os.environ)
                    env.pop("OMP_WAIT_POLICY", None)
                    env["MEDICO_PEFT_OMP_DEFAULTS"] = "0" if variant == "before" else "1"
                    cmd = [sys.executable, __file__, "--worker-config", config, "--variant", variant,
                           f"--threads={args.threads}", f"--repeats={args.repeats}", f"--warmup={args.warmup}"]
                    if onnx_dir is not None:
                        cmd.append(f"--onnx-dir={onnx_dir}")
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        raise SystemExit(f"{config}/{variant} failed:\n{proc.stderr[-3000:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    row.update(config=config, round=rnd)
                    rows.append(row)
                    med = {k: round(statistics.median(v), 3) for k, v in row["times"].items()}
                    print(f"round {rnd} {config:10s} {variant:6s} OMP_WAIT_POLICY={row['omp_wait_policy']:8s} {med}",
                          flush=True)
    return rows


def _all(rows, config, variant, key) -> list[float]:
    return [t for r in rows if r["config"] == config and r["variant"] == variant for t in r["times"][key]]


def _pair_ratios(rows, config, variant, a, b) -> list[float]:
    return [x / y for r in rows if r["config"] == config and r["variant"] == variant
            for x, y in zip(r["times"][a], r["times"][b])]


def table(rows: list[dict], args) -> str:
    med = statistics.median
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lines = [
        f"CPU, {args.threads} torch/onnxruntime threads; {args.rounds} round(s) × (before, after) subprocesses, "
        f"{args.repeats} timed repeat(s) per method after {args.warmup} warm-up; medians in seconds.",
        "*before*: torch's OpenMP default wait policy, subnormal logit gradients kept and segment_anything's "
        "decoder modules as they are; *after*: the library defaults (OMP_WAIT_POLICY=PASSIVE, subnormal gradients "
        "flushed at the logits, the eager mask decoder of `models/mask_decoding.py`). Inside one process the "
        "methods alternate step by step. A CPU shared with other jobs (see the header's load average) makes "
        "*before* look worse than on a quiet machine: spinning OpenMP threads are what suffers from sharing.", ""]
    if "decoder" in configs:
        lines += ["## Mask decoder forward (LiteMedSAM, one box, no grad): torch eager vs onnxruntime", "",
                  "| variant | torch eager s | onnxruntime s | torch / ORT |", "|---|---:|---:|---:|"]
        for v in ("before", "after"):
            t, o = med(_all(rows, "decoder", v, "torch")), med(_all(rows, "decoder", v, "ort"))
            lines.append(f"| {v} | {t:.4f} | {o:.4f} | {t / o:.2f} |")
        t, o = med(_all(rows, "decoder", "after", "torch")), med(_all(rows, "decoder", "after", "ort"))
        lines += ["", f"Goal: torch decoder within {GOAL_DECODER:g}× of onnxruntime → "
                      f"{'reached' if t / o <= GOAL_DECODER else 'not reached'} ({t / o:.2f}×).", ""]
    if "demo" in configs:
        b, a = med(_all(rows, "demo", "before", "demo")), med(_all(rows, "demo", "after", "demo"))
        lines += ["## Demo recipe step (LiteMedSAM, LoRA q,v last 2 blocks + decoder + prompt encoder, feature "
                  f"cache, batch 2 × 2 objects, {CONFIGS['demo']['sub_iterations']} sub-iterations)", "",
                  "| before s | after s | after / before |", "|---:|---:|---:|", f"| {b:.3f} | {a:.3f} | {a / b:.2f} |",
                  "", f"Goal: demo step time at least halved (after / before ≤ {GOAL_DEMO:g}) → "
                      f"{'reached' if a / b <= GOAL_DEMO else 'not reached'}.", ""]
    pairs = [c for c in configs if c in ("litemedsam", "vit_b")]
    if pairs:
        lines += ["## LoRA q,v (all blocks) + decoder vs full finetune, interleaved", "",
                  "| model | variant | LoRA step s | full step s | LoRA / full (median of pairs) |",
                  "|---|---|---:|---:|---:|"]
        for c in pairs:
            cfg = CONFIGS[c]
            name = f"{cfg['model']} {cfg.get('img_size', 256)}², batch {cfg['batch']} × {cfg['objects']} objects, " \
                   f"{cfg['sub_iterations']} sub-it."
            for v in ("before", "after"):
                lo, fu = med(_all(rows, c, v, "lora_qv")), med(_all(rows, c, v, "full"))
                lines.append(f"| {name} | {v} | {lo:.3f} | {fu:.3f} | "
                             f"{med(_pair_ratios(rows, c, v, 'lora_qv', 'full')):.2f} |")
        lines += [""] + [f"Goal: LoRA step ≤ {GOAL_RATIO:g} × full step ({c}, after) → "
                         f"{'reached' if r <= GOAL_RATIO else 'not reached'} ({r:.2f})."
                         for c in pairs for r in [med(_pair_ratios(rows, c, 'after', 'lora_qv', 'full'))]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="decoder,demo,litemedsam,vit_b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.md"))
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_config:
        worker(args)
        return
    record = Results("Training step time: LoRA vs full finetune, decoder fixes before vs after")
    rows = run(args)
    text = table(rows, args)
    print()
    print(text)
    print(f"wrote {record.write(args.out, text)}")


if __name__ == "__main__":
    main()
