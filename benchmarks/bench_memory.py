"""Peak memory and step time of one interactive training step per memory mode, as ratios to full finetune.

Every mode runs in a fresh subprocess (so the CPU peak RSS belongs to that mode alone), on the same
synthetic batch and input size, through the trainer's own code (`SegmentedEncoder` +
`InteractiveStep` + AdamW). Step time is the median over `--steps` timed steps after `--warmup`
steps (the warm-up also fills the feature cache, which is what every epoch after the first sees).
CPU peak memory = process peak RSS (it includes the Python/torch runtime; the "weights" column is
the RSS right after the base model is loaded, so peak - weights is what training itself adds).
`--gpu`: torch.cuda.max_memory_allocated instead (weights = memory_allocated after loading).
Backward as in the trainer: per sub-iteration decoder backward + one encoder backward (the default
`memory.per_iteration_backward`); `--single-backward` measures the old single backward of the summed loss.
Every mode, full finetune included, runs the same batch, objects and sub-iterations.

    python benchmarks/bench_memory.py                                   # -> benchmarks/results/memory.md
    python benchmarks/bench_memory.py --models litemedsam --steps 1 --warmup 1 --out /tmp/m.md   # quick check
    python benchmarks/bench_memory.py --gpu --vit-size 1024             # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_memory.py`
    from _results import Results, weights_source

MODES = [
    # key, label, peft config, memory options
    ("full", "full finetune", {"method": "full"}, {}),
    ("lora", "LoRA r=8 q,v, all blocks", {"method": "lora"}, {}),
    ("lora_ckpt", "LoRA all blocks + activation checkpointing", {"method": "lora"}, {"checkpointing": True}),
    ("lora_late", "LoRA late blocks + frozen prefix", {"method": "lora", "blocks": "LATE"}, {}),
    ("lora_late_cache", "LoRA late blocks + frozen-prefix feature cache", {"method": "lora", "blocks": "LATE"},
     {"cache": True}),
    ("adapter", "Adapter (parallel, w=64), all blocks", {"method": "adapter"}, {}),
    ("decoder", "decoder only (precomputed embeddings)", {"method": "decoder_only"}, {"cache": True}),
]
LATE = {"vit_b": 6, "vit_l": 6, "vit_h": 6, "vit_tiny": 2, "litemedsam": 4}


def worker(args) -> None:
    """One model × mode: build, one synthetic batch, warm-up + timed steps; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from medico_peft.models import load_model
    from medico_peft.training.config import LossConfig
    from medico_peft.training.data_source import SyntheticSlices
    from medico_peft.training.interactive_step import InteractiveStep, finish_backward
    from medico_peft.training.memory import FeatureCache, SegmentedEncoder, current_rss_bytes, peak_memory_bytes
    from medico_peft.tuners import PeftConfig, inject

    key = args.worker_mode
    _, label, peft, mem = next(m for m in MODES if m[0] == key)
    peft = dict(peft)
    if peft.get("blocks") == "LATE":
        peft["blocks"] = LATE[args.worker_model]
    device = torch.device("cuda" if args.gpu else "cpu")
    img = args.vit_size if args.worker_model.startswith("vit") else None
    model = load_model(args.worker_model, img_size=img).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        weights = current_rss_bytes()
    inject(model, PeftConfig(**peft))
    model.train()
    cache = FeatureCache(torch.float16) if mem.get("cache") else None
    encoder = SegmentedEncoder(model, frozen_prefix=True, checkpointing=mem.get("checkpointing", False), cache=cache)
    step = InteractiveStep(model, encoder, LossConfig(), args.sub_iterations, 0.5,
                           per_iteration_backward=not args.single_backward)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    data = SyntheticSlices(args.batch, model.img_size, n_objects=args.objects, seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(args.batch)])
    for k in ("object_valid",):
        batch[k][:] = True  # same number of objects in every mode
    images = batch["image"].to(device)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, stats = step(images, batch, "box", gen)
        finish_backward(loss, stats)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    print(json.dumps({"model": args.worker_model, "mode": key, "label": label, "weights": weights,
                      "peak": peak_memory_bytes(device), "step": statistics.median(times),
                      "trainable": sum(p.numel() for p in params), "prefix": encoder.n_prefix,
                      "segments": len(encoder.segments)}))


def run_all(args) -> list[dict]:
    rows = []
    modes = args.modes.split(",") if args.modes else [m[0] for m in MODES]
    modes = ["full"] + [m for m in modes if m != "full"]  # the ratios' reference
    for model in args.models.split(","):
        for key in modes:
            cmd = [sys.executable, __file__, "--worker-model", model, "--worker-mode", key]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in (
                ("batch", args.batch), ("objects", args.objects), ("steps", args.steps), ("warmup", args.warmup),
                ("sub_iterations", args.sub_iterations), ("threads", args.threads), ("vit_size", args.vit_size))]
            cmd += ["--gpu"] if args.gpu else []
            cmd += ["--bf16"] if args.bf16 else []
            cmd += ["--single-backward"] if args.single_backward else []
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{model}/{key} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model:11s} {row['label']:50s} peak {row['peak'] / 2**20:8.0f} MiB  step {row['step']:7.3f} s",
                  flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    unit = "GPU max_memory_allocated" if args.gpu else "process peak RSS"
    lines = [f"Peak memory ({unit}) and step time per memory mode; ratios to full finetune of the same model.",
             f"Batch {args.batch} image(s) × {args.objects} objects, box prompt + {args.sub_iterations} corrective "
             f"sub-iteration(s), AdamW, {'bf16 autocast' if args.bf16 else 'fp32'}, "
             f"{'single backward of the summed loss' if args.single_backward else 'per-iteration backward'}; "
             f"ViT input {args.vit_size}², "
             f"LiteMedSAM 256²; median of {args.steps} steps after {args.warmup} warm-up; "
             f"{'GPU' if args.gpu else f'{args.threads} CPU thread(s)'}.",
             "Weights: " + "; ".join(f"{m}: {weights_source(m)}" for m in dict.fromkeys(r["model"] for r in rows))
             + ". Memory and step time do not depend on the weights' values.",
             "" if args.gpu else
             "Process peak RSS includes the Python/torch runtime and the weights (the *weights* column); "
             "*peak − weights* is what training itself adds, the fair column to compare modes. "
             "Step times on a CPU shared with other jobs (see the header's load average) are unreliable.", ""]
    lines += ["| model | mode | trainable params | frozen prefix | weights MiB | peak MiB | peak − weights MiB "
              "| step s | peak / full | (peak − weights) / full | step / full |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        full = next(r for r in group if r["mode"] == "full")
        full_extra = max(1, full["peak"] - full["weights"])
        for r in group:
            extra = r["peak"] - r["weights"]
            lines.append(
                f"| {model} | {r['label']} | {r['trainable']:,} | {r['prefix']}/{r['segments']} | "
                f"{r['weights'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} | {extra / 2**20:.0f} | {r['step']:.3f} | "
                f"{r['peak'] / full['peak']:.2f} | {extra / full_extra:.2f} | {r['step'] / full['step']:.2f} |")
    lines += ["", f"Goal: best LoRA mode ≤ {GOAL_PEAK:.0%} of full finetune's peak and ≤ {GOAL_STEP:g} of its step "
                  "time (same model):"]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        full = next(r for r in group if r["mode"] == "full")
        lora = [r for r in group if r["mode"].startswith("lora")]
        if not lora:
            continue
        best = min(lora, key=lambda r: r["peak"])
        peak, step = best["peak"] / full["peak"], best["step"] / full["step"]
        ok = peak <= GOAL_PEAK and step <= GOAL_STEP
        lines.append(f"- {model}: best LoRA = {best['label']}: peak / full {peak:.2f}, step / full {step:.2f} → "
                     f"{'reached' if ok else 'not reached'}.")
    return "\n".join(lines) + "\n"


GOAL_PEAK, GOAL_STEP = 0.25, 0.7


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b,litemedsam")
    p.add_argument("--vit-size", type=int, default=512, help="ViT input size (1024 = SAM's own; slow on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--sub-iterations", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="measure torch.cuda.max_memory_allocated on a GPU")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--single-backward", action="store_true",
                   help="old path: one backward of the summed loss (memory.per_iteration_backward=false)")
    p.add_argument("--modes", default="", help=f"comma-separated subset of {','.join(m[0] for m in MODES)}")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.md"))
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_model:
        worker(args)
        return
    record = Results("Training memory modes")
    rows = run_all(args)
    text = table(rows, args)
    print()
    print(text)
    print(f"wrote {record.write(args.out, text)}")


if __name__ == "__main__":
    main()
