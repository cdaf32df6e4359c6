"""The demo workflow: the whole story on a fresh CPU machine, within a wall-clock budget.

MNI152 (nilearn's shipped template, grey/white-matter labels) → shards with a train / val / test
slab split → zero-shot LiteMedSAM on held-out test slices → two time-budgeted finetunes
(`train.max_minutes`): decoder-only (encoder frozen) and LoRA on the encoder + decoder, each
validated on the val slab and keeping its best validated weights (`adapter.safetensors`) → the
same evaluation with each saved adapter reloaded from disk → `report.md`. Nothing is downloaded.
`medico-peft demo` (commands/demo.py) parses its options and calls `run_demo`.
"""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_MINUTES = 10.0
REPORT_SECONDS = 15.0  # reserved for loading the adapters and writing the report
MIN_TRAIN_SHARE = 0.4
# Share of the training time that decoder-only gets (LoRA the rest, plus what an early stop leaves): the
# two compare at equal wall clock. Measured on the demo's MNI152 shards (2 busy cores, first 4 steps, cold
# feature cache): decoder-only 35-45 s/step, LoRA on 2 late blocks 28-41 s/step: the mask decoder's
# 4 passes (box + 3 click sub-iterations) dominate both, so neither needs more of the clock for its steps.
DECODER_SHARE = 0.5
STAGES = 6
# Validation inside the demo's training runs: few val slices, a few times per run (each costs a forward
# of the encoder and val_clicks decoder passes per slice).
VAL_SLICES = 4
VAL_EVERY_STEPS = 20
# The run's closing validation starts once the step budget is spent: reserved out of each run's budget.
VAL_RESERVE_SECONDS = 10.0
PATIENCE = 4
MNI152_TISSUES_DEMO = ("grey_matter", "white_matter")
# Click training on the evaluation's own sequence: a box start, the previous answer always fed back, one
# click per sub-iteration at the centre of the deeper error region (where evaluation and the annotator
# click), as many rounds as evaluation's clicks. With the prompt encoder's mask pathway trained too
# (`train_prompt_encoder`: it reads the painted clicks), this is what made clicks help after finetuning on
# MNI152 grey/white matter (benchmarks/results/clicks_eval_matched.md).
CLICK_TRAINING = {"click_sampling": "center", "prompt": "box", "mask_feed_prob": 1.0, "sub_iterations": 4}
# The recipe's length: 160 optimiser steps (about 4 passes over the MNI152 training slab at batch 2) with a
# warmup + cosine schedule. On MNI152's held-out slab this is where the encoder LoRA beat decoder-only
# training over 3 seeds each (benchmarks/results/realdata_cos160_seeds.md); with a constant LR the same
# length made both worse (realdata_steps160.md).
RECIPE_STEPS = 160


def cosine_schedule(steps: int) -> dict:
    """The recipe's schedule over a run of `steps` optimiser steps: warmup over 5 % of them (at least 2), then
    a cosine down to 5 % of the LR at the last step."""
    return {"kind": "cosine", "warmup_steps": max(2, round(0.05 * steps)), "total_steps": steps, "min_lr_ratio": 0.05}


# The same cosine for a run the clock ends (`train.max_minutes`, the demo's): it spans the time budget.
TIME_COSINE = {"kind": "cosine", "span": "time", "warmup_steps": 2, "min_lr_ratio": 0.05}
# The schedule of the recipe before RECIPE_STEPS' cosine: the benchmarks that measured with it pin it.
CONSTANT_SCHEDULE = {"kind": "constant", "warmup_steps": 2}


def lora_config(manifest, out_dir, lr: float, peft, progress: bool, max_minutes: float | None = None,
                steps: int = RECIPE_STEPS) -> dict:
    """LoRA (q, v) on late encoder blocks + trained mask decoder and prompt encoder: the fastest useful
    CPU recipe (also used with `decoder_only_config()` as `peft`), click-trained as evaluated
    (`CLICK_TRAINING`).

    Late blocks let the frozen prefix (TinyViT's conv stage and early blocks) be cached once per
    image. The run lasts `steps` optimiser steps under `cosine_schedule(steps)`, or, with `max_minutes`,
    as long as the clock allows under the same cosine spread over the time budget (`TIME_COSINE`).
    Every VAL_EVERY_STEPS steps (and at the end) it validates on VAL_SLICES slices of
    the val slab (box, then 3 clicks); the mean of the two Dice values picks the adapter and stops the
    run after PATIENCE validations without a gain. `peft` is the `PeftConfig` to train.
    """
    return {
        "model": {"name": "litemedsam"},
        "peft": peft.to_dict(),
        "data": {"manifest": str(manifest), "n_objects": 2, "max_val_samples": VAL_SLICES},
        "train": {"epochs": 50, "max_steps": None if max_minutes else steps, "batch_size": 2, **CLICK_TRAINING,
                  "device": "cpu", "max_minutes": max_minutes, "val_every_steps": VAL_EVERY_STEPS, "val_clicks": 3,
                  "select_by": "mean", "early_stop_patience": PATIENCE},
        "optim": {"lr": lr},
        "schedule": dict(TIME_COSINE) if max_minutes else cosine_schedule(steps),
        "output": {"dir": str(out_dir), "tensorboard": False, "progress": progress},
    }


def decoder_only_config():
    """The demo's baseline: the mask decoder and the prompt encoder trained, the image encoder frozen (the
    LoRA recipe without its LoRA: the control that isolates the encoder adaptation)."""
    from ..tuners import PeftConfig

    return PeftConfig(method="decoder_only", train_prompt_encoder=True)


def demo_peft_config(**options):
    """The demo's PeftConfig: LoRA on q, v + mask decoder + prompt encoder; `options` are PeftConfig fields
    from the command line."""
    from ..tuners import PeftConfig

    return PeftConfig(**{"method": "lora", "targets": ("q", "v"), "train_prompt_encoder": True, **options})


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out: Path, minutes: float, train_minutes: float | None, max_slices: int, clicks: int, lr: float,
             peft=None, progress: bool = True, overwrite: bool = False) -> Path:
    """Run the demo stages; returns the path of report.md. `peft` defaults to `demo_peft_config()`;
    `train_minutes` is both runs' training time together; `overwrite` lets training start again over a
    previous demo's runs in `out/train_decoder` and `out/train`."""
    peft = peft if peft is not None else demo_peft_config(blocks=2)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)

    _say(f"1/{STAGES} building shards from nilearn's MNI152 template (grey/white matter, axial train/val/test slabs)")
    t = time.perf_counter()
    from ..data.real_data import build_mni152_shards

    shards = out / "shards"
    manifest = shards / "manifest.json"
    if not manifest.exists():
        build_mni152_shards(shards, tissues=MNI152_TISSUES_DEMO)
    times["shards"] = time.perf_counter() - t

    _say(f"2/{STAGES} zero-shot LiteMedSAM on {max_slices} held-out slices (box + {clicks} clicks)")
    t = time.perf_counter()
    from ..evaluation.interactive import evaluate_interactive
    from ..models import load_model

    base = load_model("litemedsam")
    eval_args = dict(split="test", start="box", n_clicks=clicks, max_slices=max_slices, progress=progress)
    before = evaluate_interactive(base, manifest, out_dir=out / "eval_before",
                                  title="Zero-shot LiteMedSAM (MNI152 GM/WM, held-out slab)", **eval_args)
    times["eval_before"] = time.perf_counter() - t

    if train_minutes is None:
        # Each later evaluation costs about what the first did. On a busy CPU the evaluations can eat
        # the budget, so training always keeps at least MIN_TRAIN_SHARE of it (the demo then overruns).
        left = minutes * 60 - (time.perf_counter() - t0) - 2 * times["eval_before"] - REPORT_SECONDS
        train_seconds = max(left, MIN_TRAIN_SHARE * minutes * 60)
    else:
        train_seconds = train_minutes * 60
    from ..training import TrainConfig, train

    runs = {}
    for stage, (name, run_peft, share, folder) in enumerate(
            (("decoder-only", decoder_only_config(), DECODER_SHARE, "train_decoder"),
             ("LoRA", peft, 1 - DECODER_SHARE, "train")), start=3):
        budget = train_seconds * share
        if name == "LoRA":  # what decoder-only left of its share (early stopping) goes to LoRA
            budget = max(budget, train_seconds - times["train_decoder-only"])
        _say(f"{stage}/{STAGES} {name} finetuning for {budget / 60:.1f} min of wall clock "
             f"(validated every {VAL_EVERY_STEPS} steps on the val slab)")
        t = time.perf_counter()
        minutes_ = max(budget - VAL_RESERVE_SECONDS, 0.5 * budget) / 60
        cfg = TrainConfig.from_dict(lora_config(manifest, out / folder, lr, run_peft, progress, minutes_))
        runs[name] = (train(cfg, overwrite=overwrite), cfg)
        times[f"train_{name}"] = time.perf_counter() - t

    _say(f"5/{STAGES} evaluating base + each saved (validation-selected) adapter on the same slices")
    t = time.perf_counter()
    from ..adapters import load_adapter

    after = {}
    for name, (result, _) in runs.items():
        adapted = load_adapter(load_model("litemedsam"), result.adapter_path)
        folder = "eval_after" if name == "LoRA" else "eval_decoder"
        after[name] = evaluate_interactive(adapted, manifest, out_dir=out / folder,
                                           title=f"LiteMedSAM + {name} (MNI152 GM/WM, held-out slab)", **eval_args)
    times["eval_after"] = time.perf_counter() - t

    _say(f"6/{STAGES} writing the report")
    times["total"] = time.perf_counter() - t0
    return write_demo_report(out, before, after, runs, times)


def write_demo_report(out: Path, before, after: dict, runs: dict, times: dict) -> Path:
    """report.md: zero-shot vs each finetune (`after` / `runs` keyed by model name), curves, training
    runs (steps, validations, the selected step), overlays, adapter sizes and times."""
    from ..evaluation.report import plot_dice_curves, step_names
    from ..utils.atomic import atomic_write_text

    models = {"zero-shot": before, **after}
    curves_png = plot_dice_curves({name: res.mean_dice for name, res in models.items()},
                                  out / "dice_before_after.png", title="Held-out Dice: box start + clicks")
    steps = step_names(before.n_clicks)
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    lines = [
        "# medico-peft demo: LiteMedSAM zero-shot, decoder-only and LoRA on MNI152 grey/white matter (CPU)", "",
        f"Held-out test slab: {before.n_slices} axial slices ({before.n_objects} objects), never seen in training "
        "or validation. Split of the labelled axial extent: train = lowest 50 %, val = next 15 %, test = highest "
        f"30 %, 5-slice gaps (axial slice indices: {_slabs(out / 'shards' / 'manifest.json')}). "
        "Protocol: one tight box, then "
        f"{before.n_clicks} corrective clicks, each at the centre of the deeper error region, previous logits "
        "fed back with every click painted in, each click's answer accepted only in the regions it asked to change "
        "(`merge_click`); Dice at 256². Each finetuned model is the adapter its run "
        "selected on the val slab (mean of box and 3-click Dice), reloaded from disk.", "",
        "| model | label | " + " | ".join(steps) + " |", "|---|---|" + "---:|" * len(steps),
    ]
    for name, res in models.items():
        for label, values in res.per_label.items():
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append(f"| **{name}** | **all** | " + " | ".join(f"**{v:.3f}**" for v in res.mean_dice) + " |")
    lines += ["", f"![Dice vs clicks]({rel(curves_png)})", "", "## Training", ""]
    for name, (result, cfg) in runs.items():
        peft = cfg.peft
        what = ("mask decoder" if peft["method"] == "decoder_only" else
                f"LoRA rank {peft['rank']} on q,v of the last {peft['blocks']} encoder blocks + mask decoder")
        what += (" + prompt encoder" if peft["train_prompt_encoder"] else "") + (
            ", image encoder frozen" if peft["method"] == "decoder_only" else "")
        n_steps = len(result.steps)
        per_step = sum(r["step_time"] for r in result.steps) / max(1, n_steps)
        adapter = Path(result.adapter_path)
        vals = ", ".join(f"{v['step']}: {v['val_dice_box']:.3f}/{v['val_dice']:.3f}" for v in result.validations)
        png = _plot_training(result.steps, out / f"training_curve_{cfg.peft['method']}.png")
        lines += [
            f"**{name}** ({what}): lr {cfg.optim.lr:g}, batch {cfg.train.batch_size}, "
            f"{cfg.train.sub_iterations} click sub-iterations ({cfg.train.prompt} start, click sampling "
            f"`{cfg.train.click_sampling}`, answer fed back with p = {cfg.train.mask_feed_prob:g}); "
            f"{n_steps} optimiser steps in "
            f"{result.train_seconds:.0f} s ({per_step:.1f} s/step). Stopped: {stop_reason(result, cfg)}. "
            f"Validations (step: val Dice box/+{cfg.train.val_clicks} clicks): {vals or 'none'}; "
            f"adapter = step {result.best_step}.", "",
            f"![{name} training curve]({rel(png)})" if png else "(no steps recorded)", "",
            f"Adapter: `{adapter}` ({adapter.stat().st_size / 1e6:.1f} MB). Reproduce its evaluation: "
            f"`medico-peft evaluate --model litemedsam --adapter {adapter} "
            f"--manifest {out / 'shards' / 'manifest.json'} --start box --clicks {before.n_clicks} "
            f"--max-slices {before.n_slices} --out eval`.", "",
        ]
    lines += [f"## Overlays (same cases: zero-shot, then {', '.join(after)}; green truth, red prediction)", ""]
    for key in sorted(k for k in before.files if k.startswith("overlay_")):
        lines.append(" ".join(f"![{name}]({rel(res.files[key])})" for name, res in models.items()))
    lines += ["", "## Times (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", "Details: `eval_before/`, `eval_decoder/`, `eval_after/` (per_object.csv, summary.md), "
                  "`train_decoder/`, `train/` (config.yaml, metrics.csv, validations.csv)."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _slabs(manifest) -> str:
    from ..data.real_data import slab_ranges

    ranges = next(iter(slab_ranges(manifest).values()))
    return ", ".join(f"{split} {a}–{b}" for split, (a, b, _) in ranges.items())


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
