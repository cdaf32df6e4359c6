"""Peak *tensor* memory of one interactive training step per method and memory mode (GPU-equivalent, on CPU).

Each configuration runs in a fresh subprocess through the trainer's own parts (benchmarks/_step.py:
`SegmentedEncoder` + `InteractiveStep` with per-iteration backward + AdamW) on one fixed synthetic
batch in which every object is valid. `TensorMemoryTracker` (medico_peft/utils/tensor_memory.py)
counts live tensor storages by category during exactly one step: tensor memory is deterministic,
so one step is the measurement. AdamW's state is created before the step (a zero-gradient step),
and a feature cache is filled by one encoder pass before it, as in every epoch after the first.
This is what `torch.cuda.max_memory_allocated` counts on a GPU, minus allocator rounding and library
workspaces. The process peak RSS (includes the Python/torch runtime) is reported alongside.
`--gpu`: run on CUDA and report `torch.cuda.max_memory_allocated` next to the tracker, and their ratio
(benchmarks/gpu_check.sh runs it: results/memory_tensor_gpu.md).

Recipe: vit_b at 1024², batch 1, 5 objects, box + 8 click sub-iterations (MedicoSAM's); LiteMedSAM at
256², batch 4, 5 objects, 8 sub-iterations. CPU budget: ~25 min wall on a 2-core machine under load
(vit_b 1024² steps take 20-60 s each).

    nice -n 10 python benchmarks/bench_memory.py                  # -> benchmarks/results/memory_tensor.md
    python benchmarks/bench_memory.py --models litemedsam --configs full,lora_qv --out /tmp/m.md   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_memory.py`
    from _results import Results, weights_source

# key -> (label, method in _step.METHODS, options)
CONFIGS = {
    "full": ("full finetune", "full", {}),
    "full_ckpt": ("full finetune + activation checkpointing", "full", {"checkpointing": True}),
    "lora_qv_official": ("LoRA q,v, official attention (N×N map)", "lora_qv", {"official_attention": True}),
    "lora_qv": ("LoRA q,v", "lora_qv", {}),
    "lora_qv_ckpt": ("LoRA q,v + checkpointing", "lora_qv", {"checkpointing": True}),
    "lora_all_ckpt": ("LoRA all linears + checkpointing", "lora_all", {"checkpointing": True}),
    "lora_late_ckpt": ("LoRA q,v late blocks + frozen prefix + checkpointing", "lora_late", {"checkpointing": True}),
    "adapter_ckpt": ("adapter + checkpointing", "adapter", {"checkpointing": True}),
    "decoder_cache": ("decoder only + cached features", "decoder", {"cache": True}),
}
RECIPES = {
    "vit_b": dict(img_size=1024, batch=1, objects=5, sub_iterations=8),
    "litemedsam": dict(img_size=None, batch=4, objects=5, sub_iterations=8),
}
GOAL_RATIO = 0.25
GOAL_VIT_B_GIB = 4.0


def worker(args) -> None:
    import torch

    import medico_peft  # noqa: F401  (library defaults before torch work)

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _step import build, measured_step

    from medico_peft.models.vit_attention import SdpaAttention

    label, method, opts = CONFIGS[args.worker_config]
    recipe = RECIPES[args.worker_model]
    device = "cuda" if args.gpu else "cpu"
    rig = build(args.worker_model, method, img_size=recipe["img_size"], batch=recipe["batch"],
                objects=recipe["objects"], sub_iterations=recipe["sub_iterations"],
                checkpointing=opts.get("checkpointing", False), cache=opts.get("cache", False), device=device)
    if opts.get("official_attention"):
        from segment_anything.modeling.image_encoder import Attention

        for module in rig.model.modules():
            if type(module) is SdpaAttention:
                module.__class__ = Attention
    m = measured_step(rig, device)
    row = {"model": args.worker_model, "config": args.worker_config, "label": label, "peak": m["peak"],
           "by_category": m["by_category"], "seconds": m["seconds"],
           "trainable": sum(p.numel() for p in rig.params),
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        row["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
    print(json.dumps(row))


def run_all(args) -> list[dict]:
    rows = []
    for model in args.models.split(","):
        configs = args.configs.split(",") if args.configs else list(CONFIGS)
        if model == "litemedsam":  # TinyViT has its own attention: the official-vs-SDPA row is ViT-only
            configs = [c for c in configs if c != "lora_qv_official"]
        for key in configs:
            cmd = [sys.executable, __file__, "--worker-model", model, "--worker-config", key,
                   f"--threads={args.threads}"] + (["--gpu"] if args.gpu else [])
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{model}/{key} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model:11s} {row['label']:55s} peak {row['peak'] / 2**20:9.1f} MiB  ({row['seconds']:.0f} s)",
                  flush=True)
    return rows


SHORT = {"frozen_weights": "frozen w.", "trainable_weights": "trainable w.", "gradients": "grads",
         "optimizer_state": "AdamW state", "cached_features": "cached feat.", "activations": "activations"}


def table(rows: list[dict], args) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    gpu = args.gpu
    lines = [
        "Peak live tensor memory during one training step (TensorMemoryTracker: every tensor storage counted "
        "once while alive; what `torch.cuda.max_memory_allocated` counts on a GPU, without allocator rounding "
        "and library workspaces), split by category at the moment of the peak. MiB = 2²⁰ bytes.",
        "Recipes: " + "; ".join(f"{m}: {r['img_size'] or 256}², batch {r['batch']}, {r['objects']} objects, box + "
                                f"{r['sub_iterations']} click sub-iterations" for m, r in RECIPES.items()
                                if m in {x['model'] for x in rows})
        + ". fp32, AdamW, per-iteration backward (the trainer's default); ViT attention through SDPA unless "
          "the row says official.",
        "Weights: " + "; ".join(f"{m}: {weights_source(m)}" for m in dict.fromkeys(r["model"] for r in rows))
        + ". Tensor memory does not depend on the weights' values.", ""]
    cats = list(SHORT)
    head = "| model | configuration | trainable params | peak MiB | peak / full | " + \
        " | ".join(SHORT[c] for c in cats) + " | process peak RSS MiB |" + (" cuda max_allocated MiB | tracker / cuda |" if gpu else "")
    lines += [head, "|---|---|---:|---:|---:|" + "---:|" * len(cats) + "---:|" + ("---:|---:|" if gpu else "")]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        full = next((r for r in group if r["config"] == "full"), None)
        for r in group:
            ratio = f"{r['peak'] / full['peak']:.3f}" if full else "n/a"
            lines.append(f"| {model} | {r['label']} | {r['trainable']:,} | {mib(r['peak'])} | {ratio} | "
                         + " | ".join(mib(r["by_category"][c]) for c in cats) + f" | {mib(r['rss'])} |"
                         + (f" {mib(r['cuda_max_allocated'])} | {r['peak'] / r['cuda_max_allocated']:.3f} |"
                            if gpu else ""))
    lines += ["", f"Goals (vit_b 1024²): best LoRA configuration ≤ {GOAL_RATIO:.0%} of full finetune's peak; "
                  f"LoRA peak ≤ {GOAL_VIT_B_GIB:g} GiB."]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        full = next((r for r in group if r["config"] == "full"), None)
        lora = [r for r in group if r["config"].startswith("lora") and "official" not in r["config"]]
        if not lora or full is None:
            continue
        best = min(lora, key=lambda r: r["peak"])
        ratio, gib = best["peak"] / full["peak"], best["peak"] / 2**30
        verdict = "reached" if ratio <= GOAL_RATIO else "not reached"
        line = (f"- {model}: best LoRA = {best['label']}: {gib:.2f} GiB, {ratio:.3f} of full finetune "
                f"({full['peak'] / 2**30:.2f} GiB) → ratio goal {verdict}")
        if model == "vit_b":
            line += f"; ≤ {GOAL_VIT_B_GIB:g} GiB → {'reached' if gib <= GOAL_VIT_B_GIB else 'not reached'}"
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="litemedsam,vit_b")
    p.add_argument("--configs", default="", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="run on CUDA, add torch.cuda.max_memory_allocated")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_tensor.md"))
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_model:
        worker(args)
        return
    record = Results("Training memory: peak tensor bytes by category (GPU-equivalent)")
    rows = run_all(args)
    text = table(rows, args)
    print()
    print(text)
    print(f"wrote {record.write(args.out, text)}")


if __name__ == "__main__":
    main()
