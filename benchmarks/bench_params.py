"""Trainable parameters, adapter file sizes and merge time per PEFT method (vit_b and LiteMedSAM).

All rows of one model are measured side by side in one run against the same base; sizes are the
bytes of the files `save_adapter` / `save_model` write. Counts and sizes are exact; merge times
depend on the machine (and on neighbours sharing it).

    python benchmarks/bench_params.py                       # full run -> benchmarks/results/params.md
    python benchmarks/bench_params.py --models vit_tiny --out /tmp/params.md   # quick check (not a results file)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_params.py`
    from _results import Results, weights_source

from medico_peft.adapters import save_adapter
from medico_peft.models import load_model, save_model
from medico_peft.tuners import PeftConfig, inject, merge, trainable_state_dict
from medico_peft.tuners.freeze import is_peft_param

METHODS = [
    ("LoRA r=4 q,v", dict(method="lora", rank=4, alpha=4.0)),
    ("LoRA r=8 q,v", dict(method="lora", rank=8, alpha=8.0)),
    ("LoRA r=16 q,v", dict(method="lora", rank=16, alpha=16.0)),
    ("LoRA r=8 qkv (fused)", dict(method="lora", rank=8, targets=["qkv"])),
    ("DoRA r=8 q,v", dict(method="dora", rank=8)),
    ("Adapter parallel w=64", dict(method="adapter", adapter_kind="parallel")),
    ("Adapter sequential w=64", dict(method="adapter", adapter_kind="sequential")),
    ("LoRA r=8 q,v + decoder LoRA", dict(method="lora", decoder_lora=True)),
    ("decoder only", dict(method="decoder_only")),
    ("full finetune", dict(method="full")),
]


def measure(base, label: str, cfg: dict, tmp: Path, base_bytes: int) -> dict:
    model = inject(copy.deepcopy(base), PeftConfig(**cfg))
    trained = trainable_state_dict(model)
    peft_params = sum(p.numel() for n, p in trained.items() if is_peft_param(n))
    path = save_adapter(model, tmp / "adapter.safetensors")
    size = path.stat().st_size
    merge_s = None
    if PeftConfig(**cfg).mergeable and cfg["method"] not in ("decoder_only", "full"):
        start = time.perf_counter()
        merge(model, inplace=True)
        merge_s = time.perf_counter() - start
    return {"method": label, "trainable": sum(p.numel() for p in trained.values()), "peft": peft_params,
            "bytes": size, "ratio": size / base_bytes, "merge_s": merge_s}


def run(models: list[str], img_size: int | None) -> list[tuple[str, int, int, list[dict]]]:
    results = []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in models:
            base = load_model(name, img_size=img_size if name.startswith("vit") else None)
            base_bytes = save_model(base, tmp / "base.safetensors").stat().st_size
            total = sum(p.numel() for p in base.parameters())
            rows = []
            for label, cfg in METHODS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows.append(measure(base, label, cfg, tmp, base_bytes))
                print(f"{name:<11} {rows[-1]['method']:<28} {rows[-1]['trainable']:>12,} "
                      f"{rows[-1]['bytes'] / 1e6:>9.2f} MB  {rows[-1]['ratio']:>8.4f}", flush=True)
            results.append((f"{name} ({base.img_size}²)", total, base_bytes, rows, weights_source(name)))
            del base
    return results


TITLE = "Trainable parameters, adapter file size and merge time"


def to_markdown(results, note: str) -> str:
    lines = ["*Trainable* = everything `save_adapter` stores "
             "(PEFT tensors plus the mask decoder, which trains by default); *PEFT* = LoRA/DoRA/adapter tensors "
             "only (the number papers quote). *Ratio* = adapter file / base checkpoint (.safetensors). "
             "Merge = folding LoRA/DoRA into the weights and re-fusing qkv (bottleneck adapters cannot be merged). "
             f"Merge times: CPU, {torch.get_num_threads()} thread(s), one run each (see the header's load average).",
             "", *([note, ""] if note else [])]
    for model, total, base_bytes, rows, weights in results:
        lines += [f"## {model}: {total:,} parameters, base checkpoint {base_bytes / 1e6:.1f} MB", "",
                  f"Weights: {weights}. Counts, sizes and ratios do not depend on the weights; merge times "
                  "barely do.", "",
                  "| method | trainable | PEFT | share of model | adapter file | ratio to base | merge |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            merge_s = f"{r['merge_s']:.2f} s" if r["merge_s"] is not None else "—"
            lines.append(f"| {r['method']} | {r['trainable']:,} | {r['peft']:,} | {100 * r['trainable'] / total:.2f}% "
                         f"| {r['bytes'] / 1e6:.2f} MB | {r['ratio']:.4f} | {merge_s} |")
        lines.append("")
    lines += ["References: SAMed LoRA r=4 on q,v of every vit_b block = 147,456 parameters; AdaptFormer width 64 "
              "≈ 1.19 M on vit_b; micro-sam full vit_b finetuning = 93.74 M trainable.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b,litemedsam")
    parser.add_argument("--img-size", type=int, default=None, help="ViT input size (default: the model's, 1024)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "params.md"))
    parser.add_argument("--note", default="", help="extra sentence for the results file")
    args = parser.parse_args()
    record = Results(TITLE)
    results = run(args.models.split(","), args.img_size)
    record.write(args.out, to_markdown(results, args.note))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
