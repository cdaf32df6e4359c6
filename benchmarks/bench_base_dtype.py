"""A cheaper frozen base (`train.base_dtype`): fp32 vs bf16 frozen encoder weights, LoRA trained in fp32.

Two parts, each a table in benchmarks/results/base_dtype.md:

1. *memory*: parameter + buffer bytes of the model by dtype, and the peak tensor memory of one LoRA
   training step (5 objects, 8 click sub-iterations, AdamW) for LiteMedSAM 256² batch 4 and vit_b 1024²
   batch 1, random weights. Peak = bytes of the tensors alive before the step (parameters, buffers, the
   batch) + the peak of the bytes allocated inside the step and still alive, as torch's CPU allocator
   reports them to the profiler (`profile_memory=True`: every allocation event carries the running total of
   live bytes allocated since profiling began). This is what `torch.cuda.max_memory_allocated` counts on a
   GPU, minus the CUDA caching allocator's rounding; oneDNN scratch buffers outside torch's allocator are
   not counted. The tracker is checked on a hand-computed case before it is used.
2. *realdata*: LoRA r=8 q,v (all blocks) + decoder on the Colin27 + AAL training slab (bench_realdata.py's
   `lora_qv_all_blocks` with its former recipe), fp32 base vs bf16 base, same seed, same number of optimiser steps; the
   adapters are loaded onto the fp32 base (the deployment path) and scored on the held-out slab (box, then
   corrective clicks). Step time is measured side by side: both trainers built in one process, the same
   batch, steps interleaved (fp32, bf16, fp32, ...), median of the repeats.

Budget: about 20 min wall clock on the 2-core CPU under load (memory part ~5 min: the vit_b 1024² steps;
realdata ~15 min: 2 × 30 steps + 2 evaluations + the interleaved timing). Run with `nice -n 10`.

    python benchmarks/bench_base_dtype.py                       # both parts
    python benchmarks/bench_base_dtype.py --parts memory --models litemedsam --out /tmp/bd.md   # quick
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from medico_peft.training import TrainConfig
from medico_peft.training.trainer import Trainer
from medico_peft.tuners.base_dtype import bytes_by_dtype

try:
    from benchmarks._results import Results
except ImportError:  # run as `python benchmarks/bench_base_dtype.py`
    from _results import Results

HERE = Path(__file__).resolve().parent
TITLE = "A cheaper frozen base: bf16 frozen encoder weights, LoRA in fp32 (train.base_dtype)"
LORA = {"method": "lora", "rank": 8, "alpha": 8.0, "targets": ["q", "v"], "blocks": "all"}
MODELS = {"litemedsam": (256, 4), "vit_b": (1024, 1)}  # name -> (input size, batch)
# (label, train.base_dtype, memory.precision)
VARIANTS = [("fp32 base", "float32", "fp32"), ("bf16 base", "bfloat16", "fp32"),
            ("bf16 base + bf16 autocast", "bfloat16", "bf16")]
MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="memory,realdata", help="comma list of memory, realdata")
    p.add_argument("--models", default=",".join(MODELS), help="models of the memory part")
    p.add_argument("--variants", default="0,1,2",
                   help="memory part: indices into " + "; ".join(f"{i}={v[0]}" for i, v in enumerate(VARIANTS)))
    p.add_argument("--objects", type=int, default=5)
    p.add_argument("--sub-iterations", type=int, default=8, help="click sub-iterations of the memory step")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps of each real-data run")
    p.add_argument("--batch-size", type=int, default=2, help="real-data batch")
    p.add_argument("--rd-objects", type=int, default=3, help="real-data objects per training slice")
    p.add_argument("--rd-sub-iterations", type=int, default=1, help="real-data click sub-iterations")
    p.add_argument("--max-slices", type=int, default=6, help="held-out slices evaluated")
    p.add_argument("--clicks", type=int, default=4)
    p.add_argument("--timing-repeats", type=int, default=3, help="interleaved step-time repeats per base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="benchmarks/work/base_dtype")
    p.add_argument("--out", default=str(HERE / "results" / "base_dtype.md"))
    return p.parse_args(argv)


# --- tensor-true peak (torch profiler allocation events) ----------------------------------------------
def peak_allocated(fn) -> tuple[int, int, object]:
    """(peak bytes allocated inside `fn` and alive at once, bytes of them still alive at the end, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak = end = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    events = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
    # The allocator's running total is process-wide and is not reset between profiling sessions (a tensor
    # allocated in an earlier session and freed outside one stays counted), so measure from this session's
    # starting level: the first event's total minus its own size.
    events = [(t, total, size) for t, total, size in sorted(events)]
    start = events[0][1] - events[0][2] if events else 0
    for _, total, _ in events:
        peak = max(peak, total - start)
        end = total - start
    return peak, end, result


def check_tracker() -> None:
    """4 MiB + 2 MiB alive together, free 4, allocate 2: peak 6 MiB, 4 MiB left."""
    def region():
        a = torch.empty(MIB, dtype=torch.float32)
        b = torch.empty(MIB // 2, dtype=torch.float32)
        del a
        return b, torch.empty(MIB, dtype=torch.bfloat16)

    for attempt in range(2):  # the second time after the first run's survivors were freed outside a session
        peak, end, kept = peak_allocated(region)
        if (peak, end) != (6 * MIB, 4 * MIB):
            raise SystemExit(f"tracker self-check {attempt + 1} failed: peak {peak}, end {end} "
                             f"(want {6 * MIB}, {4 * MIB})")
        del kept


def _cfg(model: dict, data: dict, train: dict, out: Path, base: str, precision: str, lr: float = 5e-4,
         peft: dict = LORA) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": model, "peft": dict(peft), "data": data,
        "train": {"epochs": 1000, "device": "cpu", "base_dtype": base, **train},
        "optim": {"lr": lr}, "schedule": {"kind": "constant", "warmup_steps": 5},
        "memory": {"precision": precision},
        "output": {"dir": str(out), "tensorboard": False, "progress": False}})


def _first_batch(trainer: Trainer):
    p = trainer.parts
    p.sampler.set_position(0, 0)
    p.train_ds.set_epoch(0)
    loader = trainer.make_loader(p.train_ds, p.sampler, trainer.cfg.train.batch_size, 0)
    return next(iter(loader))


def _step(trainer: Trainer, batch) -> float:
    trainer.train_step(batch)
    trainer.optimizer_step()
    return 0.0


def _tensor_bytes(batch) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


def weights_table(args) -> list[str]:
    """Parameter + buffer bytes by dtype after injection and `train.base_dtype` (no step: quick, every model)."""
    from medico_peft.models import build_model
    from medico_peft.training.trainer import apply_base_dtype
    from medico_peft.tuners import PeftConfig, inject

    lines = ["## Parameter + buffer bytes by dtype", "",
             "LoRA r=8 q,v on every encoder block + mask decoder injected, then `train.base_dtype` applied; each "
             "storage counted once; random weights (same shapes as the real ones).", "",
             "| model | input | base | fp32 MiB | bf16 MiB | other MiB | total MiB | vs fp32 base |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        size = MODELS[name][0]
        ref = None
        for label, base in (("fp32 base", "float32"), ("bf16 base", "bfloat16")):
            model = build_model(name, img_size=size if name != "litemedsam" else None, seed=args.seed)
            inject(model, PeftConfig(**LORA))
            apply_base_dtype(model, base)
            w = bytes_by_dtype(model)
            total = sum(w.values())
            ref = ref or total
            other = total - w.get("float32", 0) - w.get("bfloat16", 0)
            lines.append(f"| {name} | {size}² | {label} | {w.get('float32', 0) / MIB:.1f} | "
                         f"{w.get('bfloat16', 0) / MIB:.1f} | {other / MIB:.1f} | {total / MIB:.1f} | "
                         f"{total / ref:.3f}× |")
            del model
            gc.collect()
    return lines


def memory_part(args, work: Path, emit) -> list[str]:
    """Weights table, then one profiled LoRA step per model and variant; `emit(lines)` after each row."""
    head = weights_table(args) + [""]
    emit(head)
    rows = []

    def table() -> list[str]:
        lines = [
            "## Peak tensor memory of one LoRA step", "",
            f"LoRA r=8 q,v on every encoder block + mask decoder (trained), random weights, {args.objects} objects "
            f"per image, {args.sub_iterations} click sub-iterations, AdamW (its state is created in this first step), "
            "frozen prefix and feature cache at their defaults. *Step peak* = tensors alive before the step "
            "(weights + batch) + the peak of the bytes allocated inside the step and alive at once (torch's CPU "
            "allocator totals, via the profiler; a GPU's `max_memory_allocated` counts the same tensors). *Left* = "
            "allocated in the step and still alive after it (AdamW state, feature cache; gradients are freed by "
            "`zero_grad(set_to_none=True)`). Step seconds: one profiled step on a busy CPU (profiler overhead "
            "included), for orientation only; the side-by-side ratio is in the real-data results.", "",
            "| model | input | batch | base | weights MiB | trainable params | step peak MiB | left after MiB | "
            "step s | step peak vs fp32 base |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        ref: dict[str, int] = {}
        for name, size, bs, label, w, trainable, before, peak, end, secs in rows:
            ref.setdefault(name, before + peak)
            lines.append(f"| {name} | {size}² | {bs} | {label} | {sum(w.values()) / MIB:.1f} | {trainable:,} | "
                         f"{(before + peak) / MIB:.1f} | {end / MIB:.1f} | {secs:.1f} | "
                         f"{(before + peak) / ref[name]:.3f}× ({(before + peak - ref[name]) / MIB:+.1f} MiB) |")
        return lines

    for name in args.models.split(","):
        size, batch_size = MODELS[name]
        for label, base, precision in [VARIANTS[int(i)] for i in args.variants.split(",")]:
            cfg = _cfg({"name": name, "pretrained": False, "img_size": size if name != "litemedsam" else None},
                       {"synthetic": 2, "n_objects": args.objects},
                       {"batch_size": batch_size, "sub_iterations": args.sub_iterations, "seed": args.seed},
                       work / "memory" / f"{name}-{base}-{precision}", base, precision)
            trainer = Trainer.from_config(cfg, overwrite=True)
            weights = bytes_by_dtype(trainer.model)
            batch = _first_batch(trainer)
            t0 = time.perf_counter()
            peak, end, _ = peak_allocated(lambda: _step(trainer, batch))
            seconds = time.perf_counter() - t0
            before = sum(weights.values()) + _tensor_bytes(batch)
            trainable = sum(p.numel() for p in trainer.parts.params)
            rows.append((name, size, batch_size, label, weights, trainable, before, peak, end, seconds))
            print(f"[bench] {name} {label}: weights {weights}, step peak {(before + peak) / MIB:.1f} MiB "
                  f"({seconds:.1f} s)", flush=True)
            trainer.close()
            del trainer, batch
            gc.collect()
            emit(head + table())
    return head + table()


# --- real data -------------------------------------------------------------------------------------
def realdata_part(args, work: Path) -> list[str]:
    from medico_peft.adapters import load_adapter
    from medico_peft.data.real_data import build_colin27_aal_shards
    from medico_peft.evaluation.interactive import evaluate_interactive
    from medico_peft.models import load_model
    from medico_peft.training import train

    shards = work / "shards"
    manifest = shards / "manifest.json"
    if not manifest.exists():
        print("[bench] building Colin27 + AAL shards (slab split)", flush=True)
        build_colin27_aal_shards(shards, size=256)

    def cfg_for(base: str, out: Path) -> TrainConfig:
        return _cfg({"name": "litemedsam"}, {"manifest": str(manifest), "n_objects": args.rd_objects},
                    {"batch_size": args.batch_size, "sub_iterations": args.rd_sub_iterations,
                     "max_steps": args.steps, "seed": args.seed}, out, base, "fp32")

    rows = []
    for base in ("float32", "bfloat16"):
        print(f"[bench] real data: LoRA with {base} base, {args.steps} steps", flush=True)
        result = train(cfg_for(base, work / "runs" / base), overwrite=True)
        model = load_adapter(load_model("litemedsam"), result.adapter_path)  # onto the fp32 base
        assert all(p.dtype == torch.float32 for p in model.parameters())
        res = evaluate_interactive(model, manifest, split="test", start="box", n_clicks=args.clicks,
                                   max_slices=args.max_slices, progress=False)
        times = [s["step_time"] for s in result.steps]
        rows.append({"base": base, "steps": len(result.steps), "box": res.mean_dice[0], "clicks": res.mean_dice[-1],
                     "objects": len(res.rows), "slices": res.n_slices, "loss": result.steps[-1]["loss"],
                     "median_step": statistics.median(times), "train_s": result.train_seconds})
        print(f"[bench] {base}: box {res.mean_dice[0]:.4f}, +{args.clicks} clicks {res.mean_dice[-1]:.4f}", flush=True)

    # Side by side: two trainers in one process, one fixed batch, interleaved steps.
    trainers = {b: Trainer.from_config(cfg_for(b, work / "timing" / b), overwrite=True) for b in ("float32", "bfloat16")}
    batch = _first_batch(trainers["float32"])
    times: dict[str, list[float]] = {b: [] for b in trainers}
    for rep in range(args.timing_repeats + 1):  # the first round warms up (and fills the feature cache)
        for b, trainer in trainers.items():
            t0 = time.perf_counter()
            _step(trainer, batch)
            if rep:
                times[b].append(time.perf_counter() - t0)
    for trainer in trainers.values():
        trainer.close()
    med = {b: statistics.median(v) for b, v in times.items()}

    c = args.clicks
    fp32 = rows[0]
    lines = [
        "## Held-out Dice at equal steps (Colin27 + AAL, real LiteMedSAM weights)", "",
        f"LoRA r=8 q,v (all blocks) + decoder, lr 5e-4 constant after 5 warm-up steps, batch {args.batch_size} × "
        f"{args.rd_objects} objects, {args.rd_sub_iterations} click sub-iterations, seed {args.seed}, "
        f"{args.steps} optimiser steps each, memory.precision fp32 (only the frozen encoder matmuls/convs run in bf16 "
        "in the bf16-base run). Each adapter is loaded onto the fp32 base and scored on the held-out upper slab: "
        f"a tight box, then {c} corrective clicks (`evaluate --start box --clicks {c}`), mean Dice over "
        f"{fp32['objects']} objects of {fp32['slices']} evenly spaced test slices. One seed per row: the Δ includes "
        f"run-to-run noise of a {args.steps}-step training, not only the base's rounding.", "",
        f"| base | steps | last loss | box Dice | +{c} clicks Dice | median step s (in its run) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['base']} | {r['steps']} | {r['loss']:.4f} | {r['box']:.4f} | {r['clicks']:.4f} | "
                     f"{r['median_step']:.2f} |")
    bf = rows[1]
    lines += ["", f"Δ (bf16 − fp32 base): box {bf['box'] - fp32['box']:+.4f}, +{c} clicks "
                  f"{bf['clicks'] - fp32['clicks']:+.4f}.", "",
              f"Step time side by side (same process, same batch, {args.timing_repeats} interleaved repeats after one "
              f"warm-up each, feature cache warm): fp32 base {med['float32']:.3f} s, bf16 base {med['bfloat16']:.3f} s "
              f"(median) → bf16/fp32 = {med['bfloat16'] / med['float32']:.2f}×.",
              "Repeats (s): fp32 " + ", ".join(f"{t:.2f}" for t in times["float32"]) + "; bf16 "
              + ", ".join(f"{t:.2f}" for t in times["bfloat16"]) + "."]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    record = Results(TITLE, argv=None if argv is None else [__file__, *argv])
    torch.manual_seed(args.seed)
    work = Path(args.work)
    parts = args.parts.split(",")
    bad = [p for p in parts if p not in ("memory", "realdata")]
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; choose from memory, realdata")
    check_tracker()
    body = [
        "`train.base_dtype: bfloat16` (or `medico-peft train --base-dtype bfloat16`) stores the image encoder's "
        "frozen Linear/Conv weights in bf16; LoRA/adapter and every trained weight, LayerNorm/BatchNorm parameters, "
        "embeddings and positional tables stay fp32, and the optimiser works on fp32. Adapters and merged/exported "
        "models are fp32. 8-bit/4-bit frozen weights are not measured: neither bitsandbytes nor torchao is "
        "installed, and bitsandbytes' 4-bit (QLoRA) kernels need a CUDA GPU.", "",
        f"torch threads: {torch.get_num_threads()}.", ""]
    if "memory" in parts:
        body += memory_part(args, work, lambda lines: record.write(args.out, "\n".join(body + lines))) + [""]
        record.write(args.out, "\n".join(body))
    if "realdata" in parts:
        body += realdata_part(args, work) + [""]
    record.write(args.out, "\n".join(body))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
