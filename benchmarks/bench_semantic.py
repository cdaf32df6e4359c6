"""Semantic segmentation on real data: does an (adapted) SAM encoder help a class head? LiteMedSAM, CPU.

Two single-subject data sets, each split by axial slab (train = lowest 60 % of the labelled extent,
test = highest 30 %, 5-slice gap; the convert defaults):
- Colin27 + AAL, classes = deep grey structures and cerebellum, left and right separate: caudate,
  putamen, pallidum, thalamus, hippocampus, amygdala (AAL parcels) and cerebellum (the union of the
  Cerebelum_* parcels per side, merged by `semantic.merge`), 14 classes + background;
- MNI152 (nilearn, no download): grey matter and white matter.

Variants, all with LiteMedSAM's real weights and a UNETR head unless noted, trained for the same
number of optimiser steps (`--steps`, batch `--batch-size`):
  frozen encoder + head (`method: decoder_only`: the encoder is frozen, the head trains);
  LoRA r=8 q,v (all blocks) + head; full finetune + head;
  the same LoRA + head from a randomly initialised encoder (MedicoSAM's question: does pretraining help?).
Each variant runs in its own process (`--variant`), so its peak RSS is its own. Scored on every
held-out (test-slab) slice holding a class: pooled per-class Dice, 2|P∩G|/(|P|+|G|), and its mean
over classes present in the test slab.

The learning rate follows the semantic recipe's shape (configs/litemedsam_semantic_lora.yaml): linear
warmup over the first 10 % of `--steps`, then cosine down to 1 % of the variant's LR at `--steps`
(`--schedule constant` keeps the LR flat, as the first runs of this script did).

CPU budget: a LoRA + UNETR step at batch 2 takes about 10 s on 2 quiet cores (AMD EPYC), so the default
run (2 data sets × 4 variants × `--steps` 10, 8 evenly spaced test slices) is a few minutes per variant
and shows early training only; a comparison that trains wants ~100 steps (`--max-test-slices 0` scores
every test slice): on MNI152 about 18 min per LoRA variant, 10 min frozen, 34 min full finetune (all four:
78 min). `--quick` (2 steps, 2 test slices, LoRA only) is a smoke test of a few minutes.

    python benchmarks/bench_semantic.py --datasets mni152 --variants lora,lora_random,frozen,full --steps 100 \
        --max-test-slices 0 --work benchmarks/work/semantic_cos100 --out benchmarks/results/semantic_mni152.md
    python benchmarks/bench_semantic.py --quick --out <tmp>/semantic.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TITLE = "Semantic segmentation heads on LiteMedSAM (Colin27 + AAL deep structures, MNI152 GM/WM)"
DEEP = ["Caudate_L", "Caudate_R", "Putamen_L", "Putamen_R", "Pallidum_L", "Pallidum_R", "Thalamus_L", "Thalamus_R",
        "Hippocampus_L", "Hippocampus_R", "Amygdala_L", "Amygdala_R"]
CEREBELLUM = {"Cerebellum_L": ["Cerebelum_*_L"], "Cerebellum_R": ["Cerebelum_*_R"]}
# name -> (table label, peft section, pretrained encoder, learning rate)
VARIANTS = {
    "frozen": ("frozen encoder + head", {"method": "decoder_only"}, True, 1e-3),
    "lora": ("LoRA r=8 q,v + head", {"method": "lora", "rank": 8, "targets": ["q", "v"]}, True, 1e-3),
    "full": ("full finetune + head", {"method": "full"}, True, 2e-4),
    "lora_random": ("LoRA r=8 q,v + head, random encoder", {"method": "lora", "rank": 8, "targets": ["q", "v"]},
                    False, 1e-3),
}
DATASETS = ("colin27_aal", "mni152")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per variant (equal for all)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--max-test-slices", type=int, default=8,
                   help="evaluate at most this many test slices, evenly spaced (0 = every test slice)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, head init, random encoder)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: warmup over 10 %% of --steps, then cosine to 1 %% of the LR (the recipe's shape)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 2 test slices, LoRA only")
    p.add_argument("--work", default="benchmarks/work/semantic", help="shards, runs and adapters")
    p.add_argument("--out", default=str(HERE / "results" / "semantic.md"))
    p.add_argument("--reuse", action="store_true",
                   help="reuse a variant's result.json from an earlier run with the same steps, batch and test slices")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.max_test_slices, args.variants = 2, 2, "lora"
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.max_test_slices < 0:
        p.error(f"--max-test-slices must be >= 0 (0 = all), got {args.max_test_slices}")
    return args


def run_dir_of(work: Path, dataset: str, variant: str, seed: int) -> Path:
    """A variant's run folder; seed 0 keeps the name earlier runs used."""
    return work / (f"run_{dataset}_{variant}" if seed == 0 else f"run_{dataset}_{variant}_seed{seed}")


def schedule_section(args) -> dict:
    """The LR schedule over exactly `--steps` optimiser steps."""
    if args.schedule == "constant":
        return {"kind": "constant"}
    return {"kind": "cosine", "warmup_steps": max(1, round(0.1 * args.steps)), "min_lr_ratio": 0.01,
            "total_steps": args.steps}


def variant_config(args, manifest: Path, run_dir: Path) -> dict:
    """The training config of variant `args.variant` on `args.dataset` (validated by TrainConfig.from_dict)."""
    _, peft, pretrained, lr = VARIANTS[args.variant]
    return {
        "task": "semantic",
        "model": {"name": "litemedsam", "pretrained": pretrained},
        "peft": peft,
        "semantic": semantic_section(args.dataset),
        "data": {"manifest": str(manifest), "samples_per_epoch": args.steps * args.batch_size, "verify": False},
        "train": {"epochs": 1, "batch_size": args.batch_size, "device": "cpu", "seed": args.seed},
        "optim": {"lr": lr, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": schedule_section(args),
        # full finetune keeps every encoder activation for backward: checkpointing bounds its peak memory
        # (a full run without it was killed for memory on the shared 24 GiB machine)
        "memory": {"feature_cache": "auto", "cache_dtype": "float32", "checkpointing": args.variant == "full"},
        "output": {"dir": str(run_dir), "tensorboard": False, "progress": False},
    }


def semantic_section(dataset: str) -> dict:
    if dataset == "colin27_aal":
        return {"head": "unetr", "classes": DEEP, "merge": CEREBELLUM}
    return {"head": "unetr"}


def build_shards(dataset: str, work: Path) -> Path:
    from medico_peft.data.real_data import build_colin27_aal_shards, build_mni152_shards

    out = work / f"shards_{dataset}"
    if (out / "manifest.json").exists():
        return out / "manifest.json"
    if dataset == "colin27_aal":
        build_colin27_aal_shards(out, size=256, labels=DEEP + ["Cerebelum_*"])
    else:
        build_mni152_shards(out, size=256, tissues=("grey_matter", "white_matter"))  # one label map per slice
    return out / "manifest.json"


def run_variant(args) -> dict:
    """Train one variant, score it on the test slab; runs in its own process (peak RSS is this run's)."""
    import torch

    from medico_peft.adapters import load_semantic_adapter
    from medico_peft.data.semantic_dataset import SemanticSlices
    from medico_peft.evaluation.semantic_metrics import class_counts, dice_from_counts
    from medico_peft.models import build_model, load_model
    from medico_peft.training import TrainConfig, train
    from medico_peft.training.memory import peak_memory_bytes

    label, _, pretrained, lr = VARIANTS[args.variant]
    work = Path(args.work)
    manifest = work / f"shards_{args.dataset}" / "manifest.json"
    run_dir = run_dir_of(work, args.dataset, args.variant, args.seed)
    cfg = TrainConfig.from_dict(variant_config(args, manifest, run_dir))
    t0 = time.perf_counter()
    result = train(cfg, overwrite=True)
    train_seconds = time.perf_counter() - t0
    peak = peak_memory_bytes(torch.device("cpu"))
    # Score from the adapter file: the round trip a user makes.
    # a random base is rebuilt from the seed the trainer built it with (train.seed), so its sha256 matches
    base = load_model("litemedsam") if pretrained else build_model("litemedsam", seed=args.seed)
    if not pretrained:
        from medico_peft.utils.hashing import sha256_state_dict

        base.base_sha256 = sha256_state_dict(base.state_dict())
    from medico_peft.training.semantic import resolve_classes

    table = resolve_classes(cfg)
    model = load_semantic_adapter(base, result.adapter_path, class_names=table.names).eval()
    test = SemanticSlices(manifest, table, split="test", verify=False)
    n = len(test) if not args.max_test_slices else min(len(test), args.max_test_slices)
    picks = [round(i * (len(test) - 1) / max(1, n - 1)) for i in range(n)] if n < len(test) else range(len(test))
    counts = torch.zeros(3, table.num_classes, dtype=torch.int64)
    with torch.no_grad():
        for i in picks:
            item = test[i]
            logits = model(item["image"][None])
            counts += class_counts(logits.argmax(1)[0], item["target"], table.num_classes)
    return {
        "variant": args.variant, "label": label, "dataset": args.dataset, "lr": lr,
        "classes": list(table.names), "dice": dice_from_counts(counts),
        "test_pixels": [int(v) for v in counts[2]], "test_slices": len(list(picks)),
        "trainable": int(sum(t.numel() for t in _adapter_tensors(result.adapter_path).values())),
        "adapter_bytes": os.path.getsize(result.adapter_path),
        "steps": result.history[-1]["step"] if result.history else 0,
        "train_seconds": train_seconds, "step_seconds": result.history[-1]["step_seconds"] if result.history else math.nan,
        "final_loss": result.history[-1]["train_loss"] if result.history else math.nan,
        "peak_rss_mb": peak / 2**20,
    }


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def fmt(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(rows: list[dict], args, record) -> None:
    sched = schedule_section(args)
    lr_text = ("constant learning rate (per variant, below)" if sched["kind"] == "constant" else
               f"learning rate (per variant, below) warmed up linearly over {sched['warmup_steps']} "
               f"step{'s' if sched['warmup_steps'] != 1 else ''}, then "
               f"cosine to {sched['min_lr_ratio']:g} of it at step {sched['total_steps']}")
    lines = [f"{args.steps} optimiser steps per variant at batch {args.batch_size} (the same slices in the same "
             f"order for every variant: seed {args.seed}), {lr_text}, AdamW, grad clip 1.0, "
             "Dice + cross-entropy, no augmentation, UNETR head (decoder widths 64, 32, 16), one seed. CPU (the "
             "header's load average says whether other jobs ran). Test = the held-out axial slab (highest 30 % of "
             "the labelled extent); Dice is pooled over its slices per class; '–' = class absent from the test "
             "slab and never predicted there. Mean = over classes present in the test slab.", ""]
    for dataset in DATASETS:
        drows = [r for r in rows if r["dataset"] == dataset]
        if not drows:
            continue
        classes = drows[0]["classes"]
        present = [i for i in range(1, len(classes)) if drows[0]["test_pixels"][i] > 0]
        title = ("Colin27 + AAL: deep structures + cerebellum" if dataset == "colin27_aal"
                 else "MNI152: grey / white matter")
        lines += [f"## {title} ({len(classes) - 1} classes; {drows[0]['test_slices']} test slices; "
                  f"{len(present)} classes present in the test slab)", ""]
        lines.append("| variant | lr | mean Dice | trainable params | adapter size | peak RSS (training + eval) "
                     "| s/step | final train loss |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in drows:
            vals = [r["dice"][i] for i in present]
            mean = sum(0.0 if math.isnan(v) else v for v in vals) / len(vals) if vals else math.nan
            lines.append(f"| {r['label']} | {r['lr']:g} | {fmt(mean)} | {r['trainable']:,} | "
                         f"{r['adapter_bytes'] / 2**20:.2f} MiB | {r['peak_rss_mb']:.0f} MiB | {r['step_seconds']:.1f} | "
                         f"{fmt(r['final_loss'])} |")
        lines += ["", "Per-class Dice on the test slab (test pixels in brackets):", ""]
        lines.append("| class | " + " | ".join(r["variant"] for r in drows) + " |")
        lines.append("|---|" + "---:|" * len(drows))
        for i in range(1, len(classes)):
            cells = " | ".join(fmt(r["dice"][i]) for r in drows)
            lines.append(f"| {classes[i]} ({drows[0]['test_pixels'][i]:,}) | {cells} |")
        lines.append("")
    record.write(Path(args.out), "\n".join(lines))


def _settings(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "max_test_slices": args.max_test_slices,
            "schedule": args.schedule, "seed": args.seed}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:  # child process
        row = run_variant(args)
        row["settings"] = _settings(args)
        from medico_peft.utils.atomic import atomic_write_text

        atomic_write_text(run_dir_of(Path(args.work), args.dataset, args.variant, args.seed) / "result.json",
                          json.dumps(row))
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    try:
        from benchmarks._results import Results
    except ImportError:  # run as `python benchmarks/bench_semantic.py`
        from _results import Results

    record = Results(TITLE, argv=None if argv is None else [__file__, *argv])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets.split(","):
        build_shards(dataset, work)
        for variant in args.variants.split(","):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--dataset", dataset,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--work", str(work),
                   "--max-test-slices", str(args.max_test_slices), "--schedule", args.schedule,
                   "--seed", str(args.seed)]
            saved = run_dir_of(work, dataset, variant, args.seed) / "result.json"
            # results written before --seed existed were seed 0
            if args.reuse and saved.exists() and {"seed": 0, **json.loads(saved.read_text()).get("settings", {})} \
                    == _settings(args):
                rows.append(json.loads(saved.read_text()))
                print(f"{dataset} {variant}: reused {saved}", flush=True)
                continue
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"variant {variant} on {dataset} failed (exit {proc.returncode})")
            rows.append(json.loads(found[-1][len("RESULT "):]))
            print(f"{dataset} {variant}: {time.perf_counter() - t0:.0f} s", flush=True)
            report(rows, args, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
