"""GPU training check: does the trainer give the same answer on CUDA as on CPU, and do its mixed-precision paths
(bf16 autocast, fp16 autocast + GradScaler) train? Real data, real LiteMedSAM weights.

    python -m benchmarks.gpu_train_check                    # on a CUDA machine -> benchmarks/results/gpu_train.md
    python -m benchmarks.gpu_train_check --cpu-dry-run      # logic check on CPU (2 steps, fp32 only)

1. Device parity: the demo's LoRA recipe (LoRA q, v on the last 2 TinyViT blocks + mask decoder; batch 2, 2
   objects, 3 click sub-iterations) for `--parity-steps` steps from one seed on CPU and on CUDA (fp32, TF32 off).
   Reported: the loss of every step on both devices and the largest difference of any saved adapter tensor.
   Random numbers (object sampling, clicks) are drawn on the CPU generator, so both runs see the same batches.
2. Precision: the same recipe for `--steps` steps on CUDA in fp32, bf16 and fp16, validated on the val slab
   (box, then 3 clicks) at the end. Reported per precision: seconds per step, the trainer's CUDA peak allocated
   memory, the mean loss of the last 10 steps and the val Dice (box / +3 clicks) of the final weights.
Shards are lzf-compressed (lossless; needs no hdf5plugin, which is too large to carry to a GPU machine).
Writes the whole results file at the end; prints each row as it is measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._results import RESULTS_DIR, Results, weights_source
except ImportError:  # run as `python benchmarks/gpu_train_check.py`
    from _results import RESULTS_DIR, Results, weights_source


def recipe(manifest: Path, out: Path, device: str, precision: str, steps: int, validate: bool) -> dict:
    from medico_peft.workflows.demo import demo_peft_config, lora_config

    raw = lora_config(manifest, out, 5e-4, demo_peft_config(rank=8, blocks=2), progress=False, steps=steps)
    raw["train"].update({"device": device, "seed": 0,
                         "val_every_steps": steps if validate else 10 ** 9, "early_stop_patience": 0})
    raw.setdefault("memory", {})["precision"] = precision
    return raw


def run(manifest: Path, out: Path, device: str, precision: str, steps: int, validate: bool):
    from medico_peft.training import TrainConfig, train

    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict(recipe(manifest, out, device, precision, steps, validate)), overwrite=True)
    return result, time.perf_counter() - t0


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU only, 2 steps, fp32: checks the script's logic")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per precision run")
    ap.add_argument("--parity-steps", type=int, default=5, help="optimiser steps of the CPU-vs-CUDA run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_train.md")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        device, precisions, args.steps, args.parity_steps = "cpu", ["fp32"], 2, 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible; use --cpu-dry-run to check the logic on CPU")
        device, precisions = "cuda", ["fp32", "bf16", "fp16"]
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    res = Results("GPU training check: CPU-vs-CUDA parity and mixed precision (real data)",
                  None if argv is None else [__file__, *argv])
    from medico_peft.data.real_data import build_mni152_shards
    from medico_peft.workflows.demo import MNI152_TISSUES_DEMO

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = Path(build_mni152_shards(tmp / "shards", size=256, tissues=MNI152_TISSUES_DEMO,
                                                 compression="lzf").manifest_path)

        cpu, _ = run(manifest, tmp / "parity_cpu", "cpu", "fp32", args.parity_steps, False)
        dev, _ = run(manifest, tmp / "parity_dev", device, "fp32", args.parity_steps, False)
        a, b = adapter_tensors(cpu.adapter_path), adapter_tensors(dev.adapter_path)
        if set(a) != set(b):
            raise SystemExit(f"adapter keys differ between CPU and {device}: {sorted(set(a) ^ set(b))[:5]}")
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        scale = max(a[k].float().abs().max().item() for k in a)
        loss_cpu = [s["loss"] for s in cpu.steps]
        loss_dev = [s["loss"] for s in dev.steps]
        lines += [f"## 1. CPU vs {device} (fp32, TF32 off), {args.parity_steps} steps from seed 0", "",
                  "| step | loss CPU | loss " + device + " | difference |", "|---:|---:|---:|---:|"]
        lines += [f"| {i + 1} | {x:.6f} | {y:.6f} | {y - x:+.2e} |" for i, (x, y) in enumerate(zip(loss_cpu, loss_dev))]
        lines += ["", f"Saved adapter ({len(a)} tensors): largest |CPU − {device}| element difference "
                      f"{worst:.2e}, against a largest |element| of {scale:.2e}.", ""]
        print("\n".join(lines), flush=True)

        lines += [f"## 2. Precision on {device}: {args.steps} steps each, seed 0, validated once at the end", "",
                  "| precision | s / step | peak allocated MiB | mean loss, last 10 steps | val Dice box | "
                  "val Dice +3 clicks | finite |", "|---|---:|---:|---:|---:|---:|---|"]
        for precision in precisions:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result, seconds = run(manifest, tmp / f"prec_{precision}", device, precision, args.steps, True)
            losses = [s["loss"] for s in result.steps]
            val = result.validations[-1] if result.validations else {}
            box = val.get("val_dice_box", float("nan"))
            clicks = val.get("val_dice", float("nan"))
            peak = result.peak_memory_bytes / 2 ** 20
            row = (f"| {precision} | {seconds / max(len(losses), 1):.3f} | {peak:,.0f} | "
                   f"{np.mean(losses[-10:]):.4f} | {box:.3f} | {clicks:.3f} | "
                   f"{'yes' if np.isfinite(losses).all() else 'NO'} |")
            lines.append(row)
            print(row, flush=True)
    head = (f"LiteMedSAM ({weights_source('litemedsam')}) on nilearn's MNI152 grey/white matter, the demo's slab "
            "split and LoRA recipe (batch 2, 2 objects, 3 click sub-iterations, lr 5e-4 constant). s / step includes "
            "data loading and the first step's warm-up; the validation at the end is not in it. Peak allocated = "
            "the trainer's `torch.cuda.max_memory_allocated` (process RSS on CPU).\n\n")
    path = res.write(args.out, head + "\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
