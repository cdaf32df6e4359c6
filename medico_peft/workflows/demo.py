"""The demo workflow: the whole story on a fresh CPU machine, within a wall-clock budget.

MNI152 (nilearn's shipped template, grey/white-matter labels) → shards with a slab split →
zero-shot LiteMedSAM on held-out slices → time-budgeted LoRA finetuning (`train.max_minutes`) →
the same evaluation with the saved adapter reloaded from disk → `report.md`. Nothing is downloaded.
`medico-peft demo` (commands/demo.py) parses its options and calls `run_demo`.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_MINUTES = 10.0
REPORT_SECONDS = 15.0  # reserved for loading the adapter and writing the report
MIN_TRAIN_SHARE = 0.4


def lora_config(manifest, out_dir, lr: float, peft, progress: bool, max_minutes: float | None = None) -> dict:
    """LoRA (q, v) on late encoder blocks + trained mask decoder: the fastest useful CPU recipe.

    Late blocks let the frozen prefix (TinyViT's conv stage and early blocks) be cached once per
    image; a constant LR suits a run whose length is set by the clock (`train.max_minutes`) rather
    than by epochs. `peft` is the `PeftConfig` to train.
    """
    return {
        "model": {"name": "litemedsam"},
        "peft": peft.to_dict(),
        "data": {"manifest": str(manifest), "n_objects": 2},
        "train": {"epochs": 50, "batch_size": 2, "sub_iterations": 3, "device": "cpu", "max_minutes": max_minutes},
        "optim": {"lr": lr},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "output": {"dir": str(out_dir), "tensorboard": False, "progress": progress},
    }


def demo_peft_config(**options):
    """The demo's PeftConfig: LoRA on q, v; `options` are PeftConfig fields from the command line."""
    from ..tuners import PeftConfig

    return PeftConfig(**{"method": "lora", "targets": ("q", "v"), **options})


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out: Path, minutes: float, train_minutes: float | None, max_slices: int, clicks: int, lr: float,
             peft=None, progress: bool = True, overwrite: bool = False) -> Path:
    """Run the five demo stages; returns the path of report.md. `peft` defaults to `demo_peft_config()`;
    `overwrite` lets training start again over a previous demo's run in `out/train`."""
    peft = peft if peft is not None else demo_peft_config(blocks=2)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)

    _say("1/5 building shards from nilearn's MNI152 template (grey/white matter, axial slab split)")
    t = time.perf_counter()
    from ..data.real_data import build_mni152_shards

    shards = out / "shards"
    manifest = shards / "manifest.json"
    if not manifest.exists():
        build_mni152_shards(shards)
    times["shards"] = time.perf_counter() - t

    _say(f"2/5 zero-shot LiteMedSAM on {max_slices} held-out slices (box + {clicks} clicks)")
    t = time.perf_counter()
    from ..evaluation.interactive import evaluate_interactive
    from ..models import load_model

    base = load_model("litemedsam")
    eval_args = dict(split="test", start="box", n_clicks=clicks, max_slices=max_slices, progress=progress)
    before = evaluate_interactive(base, manifest, out_dir=out / "eval_before",
                                  title="Zero-shot LiteMedSAM (MNI152 GM/WM, held-out slab)", **eval_args)
    times["eval_before"] = time.perf_counter() - t

    if train_minutes is None:
        # The second evaluation costs about what the first did. On a busy CPU the evaluations can eat
        # the budget, so training always keeps at least MIN_TRAIN_SHARE of it (the demo then overruns).
        left = minutes * 60 - (time.perf_counter() - t0) - times["eval_before"] - REPORT_SECONDS
        train_seconds = max(left, MIN_TRAIN_SHARE * minutes * 60)
    else:
        train_seconds = train_minutes * 60
    _say(f"3/5 LoRA finetuning for {train_seconds / 60:.1f} min of wall clock")
    t = time.perf_counter()
    from ..training import TrainConfig, train

    cfg = TrainConfig.from_dict(lora_config(manifest, out / "train", lr, peft, progress, train_seconds / 60))
    result = train(cfg, overwrite=overwrite)
    times["train"] = time.perf_counter() - t

    _say("4/5 evaluating base + saved adapter on the same slices")
    t = time.perf_counter()
    from ..adapters import load_adapter

    adapted = load_adapter(load_model("litemedsam"), result.adapter_path)
    after = evaluate_interactive(adapted, manifest, out_dir=out / "eval_after",
                                 title="LiteMedSAM + LoRA (MNI152 GM/WM, held-out slab)", **eval_args)
    times["eval_after"] = time.perf_counter() - t

    _say("5/5 writing the report")
    times["total"] = time.perf_counter() - t0
    return write_demo_report(out, before, after, result, times, cfg)


def write_demo_report(out: Path, before, after, result, times: dict, cfg) -> Path:
    """report.md with the before/after table, curves, overlays, adapter size and times."""
    from ..evaluation.report import plot_dice_curves, step_names
    from ..utils.atomic import atomic_write_text

    curves_png = plot_dice_curves({"zero-shot": before.mean_dice, "LoRA": after.mean_dice},
                                  out / "dice_before_after.png", title="Held-out Dice: box start + clicks")
    train_png = _plot_training(result.steps, out / "training_curve.png")
    steps = step_names(before.n_clicks)
    adapter = Path(result.adapter_path)
    size_mb = adapter.stat().st_size / 1e6
    n_steps = len(result.steps)
    per_step = sum(r["step_time"] for r in result.steps) / max(1, n_steps)
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    lines = [
        "# medico-peft demo: LiteMedSAM + LoRA on MNI152 grey/white matter (CPU)", "",
        f"Held-out slab: {before.n_slices} axial slices ({before.n_objects} objects), never seen in training. "
        f"Protocol: one tight box, then {before.n_clicks} corrective clicks, each at the centre of the "
        "deeper error region, previous logits fed back with every click painted in; Dice at 256².", "",
        "| model | label | " + " | ".join(steps) + " |", "|---|---|" + "---:|" * len(steps),
    ]
    for name, res in (("zero-shot", before), ("LoRA", after)):
        for label, values in res.per_label.items():
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append(f"| **{name}** | **all** | " + " | ".join(f"**{v:.3f}**" for v in res.mean_dice) + " |")
    peft = cfg.peft
    lines += [
        "", f"![Dice vs clicks]({rel(curves_png)})", "",
        "## Training", "",
        f"LoRA rank {peft['rank']} on q,v of the last {peft['blocks']} encoder blocks + mask decoder, "
        f"lr {cfg.optim.lr:g}, batch {cfg.train.batch_size}, {cfg.train.sub_iterations} click sub-iterations; "
        f"{n_steps} optimiser steps in {result.train_seconds:.0f} s ({per_step:.1f} s/step). "
        f"Stopped: {stop_reason(result, cfg)}.",
        "", f"![training curve]({rel(train_png)})" if train_png else "(no steps recorded)", "",
        f"Adapter: `{adapter}` ({size_mb:.1f} MB; LoRA tensors + the finetuned decoder). "
        f"Reproduce the evaluation: `medico-peft evaluate --model litemedsam --adapter {adapter} "
        f"--manifest {out / 'shards' / 'manifest.json'} --start box --clicks {before.n_clicks} "
        f"--max-slices {before.n_slices} --out eval`.", "",
        "## Overlays (same cases before and after; green truth, red prediction)", "",
    ]
    for key in sorted(k for k in before.files if k.startswith("overlay_")):
        lines.append(f"![before]({rel(before.files[key])}) ![after]({rel(after.files[key])})")
    lines += ["", "## Times (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", "Details: `eval_before/`, `eval_after/` (per_object.csv, summary.md), `train/` (config.yaml, metrics)."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def stop_reason(result, cfg) -> str:
    """Why training ended, as the trainer logged it (`TrainResult.stop_reason`), else the epoch count ran out."""
    if result.stop_reason:
        return result.stop_reason
    return f"all train.epochs={cfg.train.epochs} epochs done"


def _plot_training(steps: list[dict], path: Path):
    """Loss and train Dice per optimiser step (the run is too short for per-epoch curves)."""
    if not steps:
        return None
    from ..utils.figures import pyplot, save_png

    plt = pyplot()

    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(x, [r["loss"] for r in steps], label="loss", color="tab:red")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(x, [r["dice"] for r in steps], label="train Dice", color="tab:blue")
    ax2.set_ylabel("train Dice")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
