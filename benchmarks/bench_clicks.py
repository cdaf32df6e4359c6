"""Do corrective clicks help, and why not when they do not? The click rule, measured by ablation.

    python -m benchmarks.bench_clicks [--steps 40] [--slices 8] [--colin27-slices 4] [--seeds 0 1 2] [--tasks ...]
                                      [--kinds ...] [--rules ...] [--out benchmarks/results/clicks.md]

Per task (real data, held-out test slab; the demo's split: train lowest 50 %, val next 15 %, test highest 30 %
of the labelled axial extent, 5-slice gaps):
  - mni152: MNI152 template, grey and white matter (the demo's task);
  - colin27: Colin27 T1 + AAL, every structure of the test slab (cortical parcels: the upper slab holds no deep
    nucleus).
Models: zero-shot LiteMedSAM (real weights) and, per seed, the demo's two finetunes at equal optimiser steps
(`--steps`): decoder-only, and LoRA (q, v of the last 2 TinyViT blocks) + decoder, each the adapter its run selected
on the val slab; and the LoRA recipe with click training (`train.click_sampling=interior`: training clicks at
least a click radius inside their error region; `loss.click_bce=1`: cross-entropy on the clicked disks), the one
change against LoRA (`--kinds LoRA+interior` adds the same run without the click loss: interior training clicks
alone; `LoRA+click-bce` the click loss alone; `LoRA+8-sub-iterations` MedicoSAM's 8 click rounds per step).
Every model is evaluated with the same protocol (one tight box, then 4 clicks at the centre of the deeper error)
under four click rules that differ in one thing each:
  - tokens: clicks as SAM point tokens, previous logits fed back, the decoder's whole answer kept (official SAM);
  - painted: + every click painted into the fed-back logits (models/click_prompt.py `paint_clicks`);
  - painted+local: + the answer accepted only where the click asked for a change (`merge_click`; the library
    default of evaluation, validation and the Predictor);
  - painted+near: + that change bounded to 3 click radii around the click (`click_merge="near"`: for thin
    structures, where the changed pixels form one band across the image);
  - oracle: the error region under the click replaced by the truth (no model: what one perfect local click per
    round can give at most; an upper bound for any click rule).
Dice at 256² per step; mean over objects; finetuned rows are mean ± std over seeds.

CPU budget: per seed and task two finetunes of `--steps` steps (≈ 4-5 s a step on 2 quiet cores) and 3 models × 3
rules × the test slices (≈ 2 s a slice for MNI152, ≈ 10 s for Colin27's ~30 objects a slice; twice that and more
on a loaded CPU): about 30 minutes for one seed and both tasks at the defaults on a quiet machine. Run with `nice -n 10`.
Writes benchmarks/results/clicks.md (and benchmarks/work/clicks/).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks._answers import answers_lines
    from benchmarks._results import RESULTS_DIR, Results, weights_source
    from benchmarks._tasks import build_shards
except ImportError:  # run as `python benchmarks/bench_clicks.py`
    from _answers import answers_lines
    from _results import RESULTS_DIR, Results, weights_source
    from _tasks import build_shards

RULES = {  # name -> evaluate_interactive options
    "tokens": {"click_radius": 0.0, "click_merge": "none"},
    "painted": {"click_merge": "none"},
    "painted+local": {"click_merge": "local"},
    "painted+near": {"click_merge": "near"},
}
RULE_TEXT = {  # the report describes only the rules a run evaluated
    "tokens": "tokens = official SAM feedback",
    "painted": "painted = clicks painted into the fed-back logits",
    "painted+local": "painted+local = painted, and the answer taken only in the regions the click asked to change "
                     "(library default)",
    "painted+near": "painted+near = painted+local within 3 click radii of the click",
    "oracle": "oracle = the clicked error region set to the truth (upper bound, no model)",
}
# training on the evaluation's own sequence: one click per round where evaluation clicks, box start, the answer
# always fed back, as many rounds as evaluation's clicks
EVAL_MATCHED = {"click_sampling": "center", "prompt": "box", "mask_feed_prob": 1.0, "sub_iterations": 4}
# The recipe every kind changes: the demo's `lora_config` as it was before its click-training switch (3 click
# sub-iterations with uniform random clicks, alternating box / point starts, the answer fed back with p = 0.5, the
# prompt encoder frozen) and before its cosine (a constant LR after 2 warmup steps), pinned here so that every
# results file stays reproducible. The demo's recipe now is LoRA+eval-matched+prompt-encoder with the cosine of
# RECIPE_STEPS (tests/test_gpu_check_dry_run.py checks it key by key).
BASE = {"train": {"sub_iterations": 3, "click_sampling": "uniform", "prompt": "alternate", "mask_feed_prob": 0.5},
        "peft": {"train_prompt_encoder": False}, "schedule": {"kind": "constant", "warmup_steps": 2,
                                                              "min_lr_ratio": 0.0, "total_steps": None}}
# finetune kind -> its one change against BASE (decoder-only: the encoder frozen instead of LoRA)
CHANGES = {
    "decoder-only": {},
    "decoder-only+interior": {"train": {"click_sampling": "interior"}},
    "LoRA": {},
    "LoRA+interior": {"train": {"click_sampling": "interior"}},
    "LoRA+click-training": {"train": {"click_sampling": "interior"}, "loss": {"click_bce": 1.0}},
    "LoRA+click-bce": {"loss": {"click_bce": 1.0}},
    "LoRA+8-sub-iterations": {"train": {"sub_iterations": 8}},
    "LoRA+center-clicks": {"train": {"click_sampling": "center"}},
    "LoRA+eval-matched": {"train": EVAL_MATCHED},
    "LoRA+prompt-encoder": {"peft": {"train_prompt_encoder": True}},
    "decoder-only+prompt-encoder": {"peft": {"train_prompt_encoder": True}},
    "LoRA+eval-matched+prompt-encoder": {"train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True}},
    "decoder-only+eval-matched+prompt-encoder": {"train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True}},
    # where the encoder LoRA goes, on top of the recommended recipe (LoRA+eval-matched+prompt-encoder)
    "LoRA-all-blocks+eval-matched+prompt-encoder": {"train": EVAL_MATCHED,
                                                    "peft": {"train_prompt_encoder": True, "blocks": "all"}},
    "LoRA-all-linears+eval-matched+prompt-encoder": {"train": EVAL_MATCHED, "peft": {
        "train_prompt_encoder": True, "targets": ["qkv", "proj", "mlp"]}},
    # the learning-rate schedule of the recommended recipe: cosine from lr to 0 over the run's steps (the demo's
    # val selection kept step 20 of 40+ under the constant lr; too high an lr late in a run, or validation noise)
    "LoRA+eval-matched+prompt-encoder+cosine": {"train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True},
                                                "schedule": {"kind": "cosine"}},
    "decoder-only+eval-matched+prompt-encoder+cosine": {"train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True},
                                                        "schedule": {"kind": "cosine"}},
    # the recommended recipe with `loss.click_region`: each click round's loss also scores the whole error region
    # the click landed in (what the evaluation's local merge accepts), not only the whole mask
    "LoRA+eval-matched+prompt-encoder+click-region": {"train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True},
                                                      "loss": {"click_region": 1.0}},
    "decoder-only+eval-matched+prompt-encoder+click-region": {"train": EVAL_MATCHED,
                                                              "peft": {"train_prompt_encoder": True},
                                                              "loss": {"click_region": 1.0}},
    "decoder-only+eval-matched+prompt-encoder+click-region-0.25": {"train": EVAL_MATCHED,
                                                                   "peft": {"train_prompt_encoder": True},
                                                                   "loss": {"click_region": 0.25}},
    # the region loss on positive clicks only: with both kinds the decoder learnt to erase whole masks after a
    # negative click (clicks_region.md), while positive clicks gained most
    "LoRA+eval-matched+prompt-encoder+click-region-positive": {
        "train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True},
        "loss": {"click_region": 1.0, "click_region_clicks": "positive"}},
    "decoder-only+eval-matched+prompt-encoder+click-region-positive": {
        "train": EVAL_MATCHED, "peft": {"train_prompt_encoder": True},
        "loss": {"click_region": 1.0, "click_region_clicks": "positive"}},
}
KINDS = ("decoder-only", "LoRA", "LoRA+click-training")  # the default run (clicks.md)
CLICKS = 4
LR = 5e-4


def finetune(kind: str, manifest: Path, out: Path, steps: int, seed: int, device: str = "cpu", lr: float = LR) -> Path:
    from medico_peft.training import TrainConfig, train
    from medico_peft.workflows.demo import decoder_only_config, demo_peft_config, lora_config

    peft = decoder_only_config() if kind.startswith("decoder-only") else demo_peft_config(rank=8, blocks=2)
    raw = lora_config(manifest, out, lr, peft, progress=False)
    raw["train"].update({"max_steps": steps, "seed": seed, "device": device})
    for section, values in (*BASE.items(), *CHANGES[kind].items()):
        raw.setdefault(section, {}).update(values)
    if raw["schedule"]["kind"] == "cosine":  # the cosine spans the run (warmup included), ending at lr 0
        raw["schedule"]["total_steps"] = steps
    result = train(TrainConfig.from_dict(raw), overwrite=True)
    return Path(result.adapter_path)


def oracle_dice(model, manifest: Path, max_slices: int) -> list[float]:
    """Mean Dice per step when each click fixes, with the truth, the whole error region it lands in."""
    from scipy.ndimage import label as regions

    import medico_peft.evaluation.interactive as protocol
    from medico_peft.evaluation.clicks import center_correction

    real = protocol.run_protocol

    def perfect_local_clicks(segmenter, image, gt, input_size, start="box", n_clicks=CLICKS, **_):
        trace = real(segmenter, image, gt, input_size, start, 0)
        masks = trace.start_masks.copy()
        dice = [trace.dice[:, 0]]
        for _ in range(n_clicks):
            for j in range(gt.shape[0]):
                click = center_correction(masks[j], gt[j])
                if click is None:
                    continue
                (x, y), _label = click
                err, _n = regions(masks[j] ^ gt[j], structure=np.ones((3, 3), bool))
                region = err == err[int(y), int(x)]
                masks[j][region] = gt[j][region]
            inter = (masks & gt).sum((1, 2))
            dice.append(2 * inter / np.maximum(masks.sum((1, 2)) + gt.sum((1, 2)), 1))
        return protocol.SliceTrace(np.stack(dice, 1), trace.start_masks, masks, trace.points, trace.point_labels,
                                   trace.boxes)

    protocol.run_protocol = perfect_local_clicks
    try:
        return protocol.evaluate_interactive(model, manifest, n_clicks=CLICKS, max_slices=max_slices,
                                             progress=False).mean_dice
    finally:
        protocol.run_protocol = real


def evaluate_rules(model, manifest: Path, max_slices: int, rules=(*RULES, "oracle"),
                   answers: list | None = None) -> dict[str, list[float]]:
    """Mean Dice per step under each rule; `answers` (a list) receives the library default rule's
    (painted+local) `click_response_summary` rows."""
    from medico_peft.evaluation.interactive import evaluate_interactive
    from medico_peft.evaluation.report import click_response_summary

    out = {}
    for rule in rules:
        if rule == "oracle":
            out[rule] = oracle_dice(model, manifest, max_slices)
            continue
        res = evaluate_interactive(model, manifest, n_clicks=CLICKS, max_slices=max_slices, progress=False,
                                   **RULES[rule])
        out[rule] = res.mean_dice
        if rule == "painted+local" and answers is not None:
            answers.append(click_response_summary(res.click_rows))
    return out


def _fmt(values: list[list[float]]) -> list[str]:
    arr = np.asarray(values, float)
    if arr.shape[0] == 1:
        return [f"{v:.3f}" for v in arr[0]]
    return [f"{m:.3f} ± {s:.3f}" for m, s in zip(arr.mean(0), arr.std(0))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per finetune (equal for both)")
    ap.add_argument("--slices", type=int, default=8, help="held-out MNI152 test slices (evenly spaced)")
    ap.add_argument("--colin27-slices", type=int, default=4,
                    help="held-out Colin27 test slices (~30 objects each, so fewer)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tasks", nargs="+", default=["mni152", "colin27"], choices=("mni152", "colin27"))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=tuple(CHANGES),
                    help="finetunes to run per seed (+interior: interior training clicks, no click loss)")
    ap.add_argument("--rules", nargs="+", default=[*RULES, "oracle"], choices=(*RULES, "oracle"),
                    help="click rules to evaluate every model with")
    ap.add_argument("--lr", type=float, default=LR, help=f"constant learning rate of every finetune (default {LR:g})")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where training and evaluation run")
    ap.add_argument("--compression", help="shard compression (default: the library's; lzf where hdf5plugin is absent)")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/clicks"))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "clicks.md")
    args = ap.parse_args(argv)
    import torch

    from medico_peft.adapters import load_adapter
    from medico_peft.models import load_model

    torch.set_num_threads(2 if args.device == "cpu" else 8)
    res = Results("Corrective clicks: which click rule makes clicks help (ablation, real data, "
                  f"{'CPU' if args.device == 'cpu' else 'CUDA'})", argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    table: dict[tuple[str, str, str], list[list[float]]] = {}
    answers: dict[tuple[str, str], list[list[dict]]] = {}  # (task, model) -> per run, how its clicks were answered
    notes = []
    slices = {"mni152": args.slices, "colin27": args.colin27_slices}
    done = []
    for task in args.tasks:
        manifest = build_shards(task, args.work / task / "shards", args.compression)
        t0 = time.monotonic()
        zero = evaluate_rules(load_model("litemedsam").to(args.device).eval(), manifest, slices[task], args.rules,
                              answers.setdefault((task, "zero-shot"), []))
        for rule, dice in zero.items():
            table.setdefault((task, "zero-shot", rule), []).append(dice)
        notes.append(f"{task} zero-shot: {time.monotonic() - t0:.0f} s")
        seeds_done = []
        for seed in args.seeds:
            for kind in args.kinds:
                t0 = time.monotonic()
                adapter = finetune(kind, manifest, args.work / task / f"{kind}_seed{seed}", args.steps, seed,
                                   args.device, args.lr)
                t1 = time.monotonic()
                model = load_adapter(load_model("litemedsam"), adapter).to(args.device).eval()
                for rule, dice in evaluate_rules(model, manifest, slices[task], args.rules,
                                                 answers.setdefault((task, kind), [])).items():
                    table.setdefault((task, kind, rule), []).append(dice)
                notes.append(f"{task} {kind} seed {seed}: train {t1 - t0:.0f} s, evaluate {time.monotonic() - t1:.0f} s")
                print(f"[bench_clicks] {notes[-1]}", flush=True)
            seeds_done.append(seed)
            if seed != args.seeds[-1]:  # whole file after every seed, so a run cut short keeps what it measured
                path = res.write(args.out, report(args, table, notes, slices, done, seeds_done, answers))
        done.append(task)
        path = res.write(args.out, report(args, table, notes, slices, done, seeds_done, answers))  # whole file per task
    print(f"wrote {path}")
    return 0


def _variants(kinds) -> str:
    said = {"decoder-only+interior": "decoder-only+interior = the decoder-only run with "
                                     "`train.click_sampling=interior` (its only change)",
            "LoRA+interior": "LoRA+interior = the same LoRA run with `train.click_sampling=interior` (training clicks "
                             "at least a click radius inside their error region; its only change)",
            "LoRA+click-training": "LoRA+click-training = the same LoRA run with `train.click_sampling=interior` and "
                                   "`loss.click_bce=1` (cross-entropy on the clicked disks)",
            "LoRA+click-bce": "LoRA+click-bce = the same LoRA run with `loss.click_bce=1` (cross-entropy on the clicked "
                              "disks; training clicks uniform as in LoRA; its only change)",
            "LoRA+8-sub-iterations": "LoRA+8-sub-iterations = the same LoRA run with `train.sub_iterations=8` "
                                     "(MedicoSAM's 8 click rounds per step instead of 3; its only change)",
            "LoRA+center-clicks": "LoRA+center-clicks = the same LoRA run with `train.click_sampling=center` (one "
                                  "training click per sub-iteration at the centre of the deeper error, where "
                                  "evaluation clicks; its only change)",
            "LoRA+eval-matched": "LoRA+eval-matched = the same LoRA run trained on the evaluation's own sequence: "
                                 "`train.click_sampling=center`, `train.prompt=box`, `train.mask_feed_prob=1`, "
                                 "`train.sub_iterations=4`",
            "decoder-only+prompt-encoder": "decoder-only+prompt-encoder = the decoder-only run with "
                                           "`peft.train_prompt_encoder=true` (its only change)",
            "LoRA+prompt-encoder": "LoRA+prompt-encoder = the same LoRA run with `peft.train_prompt_encoder=true` "
                                   "(the mask-prompt pathway that carries the painted clicks trains too; its only "
                                   "change)",
            "LoRA+eval-matched+prompt-encoder": "LoRA+eval-matched+prompt-encoder = LoRA+eval-matched with "
                                                "`peft.train_prompt_encoder=true`",
            "LoRA-all-blocks+eval-matched+prompt-encoder": "LoRA-all-blocks+eval-matched+prompt-encoder = "
                                                           "LoRA+eval-matched+prompt-encoder with LoRA in all 10 "
                                                           "TinyViT attention blocks (`peft.blocks=all`)",
            "LoRA-all-linears+eval-matched+prompt-encoder": "LoRA-all-linears+eval-matched+prompt-encoder = "
                                                            "LoRA+eval-matched+prompt-encoder with LoRA on every "
                                                            "linear of the last 2 blocks (`peft.targets=[qkv, proj, "
                                                            "mlp]`)",
            "LoRA+eval-matched+prompt-encoder+cosine": "LoRA+eval-matched+prompt-encoder+cosine = "
                                                       "LoRA+eval-matched+prompt-encoder with `schedule.kind=cosine` "
                                                       "(after the same warmup, lr falls to 0 at the last step)",
            "decoder-only+eval-matched+prompt-encoder+cosine": "decoder-only+eval-matched+prompt-encoder+cosine = "
                                                               "the decoder-only control with the same cosine "
                                                               "schedule",
            "LoRA+eval-matched+prompt-encoder+click-region": "LoRA+eval-matched+prompt-encoder+click-region = "
                                                             "LoRA+eval-matched+prompt-encoder with "
                                                             "`loss.click_region=1` (cross-entropy over the error "
                                                             "region each click landed in)",
            "decoder-only+eval-matched+prompt-encoder+click-region": "decoder-only+eval-matched+prompt-encoder+"
                                                                     "click-region = the decoder-only control with "
                                                                     "the same `loss.click_region=1`",
            "decoder-only+eval-matched+prompt-encoder+click-region-0.25": "decoder-only+eval-matched+prompt-encoder+"
                                                                          "click-region-0.25 = the decoder-only "
                                                                          "control with `loss.click_region=0.25`",
            "LoRA+eval-matched+prompt-encoder+click-region-positive": "LoRA+eval-matched+prompt-encoder+"
                                                                      "click-region-positive = "
                                                                      "LoRA+eval-matched+prompt-encoder with "
                                                                      "`loss.click_region=1` on positive clicks' "
                                                                      "regions only (`loss.click_region_clicks="
                                                                      "positive`)",
            "decoder-only+eval-matched+prompt-encoder+click-region-positive": "decoder-only+eval-matched+"
                                                                              "prompt-encoder+click-region-positive "
                                                                              "= the decoder-only control with the "
                                                                              "same positive-only region loss",
            "decoder-only+eval-matched+prompt-encoder": "decoder-only+eval-matched+prompt-encoder = the decoder-only "
                                                        "run with the same two changes (the control that isolates "
                                                        "the encoder LoRA)"}
    return "; ".join(said[k] for k in kinds if k in said) or "no click-training variant"


def report(args, table, notes, slices, done, seeds_done, answers=None) -> str:
    lines = [
        f"LiteMedSAM ({weights_source('litemedsam')}). Finetunes: the demo's former recipe (`workflows/demo.py` "
        f"`lora_config` with bench_clicks' `BASE`: batch 2, 2 objects, 3 click sub-iterations with random clicks, "
        f"box or point start, mask fed back with p = 0.5, clicks painted, prompt encoder frozen, lr {args.lr:g} constant, "
        f"val every 20 steps, adapter selected on the val slab) for {args.steps} "
        f"optimiser steps each; {_variants(args.kinds)}; seeds {', '.join(map(str, seeds_done))}. Evaluation: held-out test slices evenly "
        f"spaced over the test slab ({', '.join(f'{t} {slices[t]}' for t in args.tasks)}), one tight box then "
        f"{CLICKS} clicks at the centre of "
        "the deeper error region; Dice at 256², mean over objects (± std over seeds).", "",
        "| task | model | click rule | box | +1 | +2 | +3 | +4 | +4 − box |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (task, kind, rule), runs in table.items():
        gain = np.asarray(runs, float)
        gain = gain[:, -1] - gain[:, 0]
        g = f"{gain.mean():+.3f}" + (f" ± {gain.std():.3f}" if len(gain) > 1 else "")
        name = f"**{rule}**" if rule == "painted+local" else rule
        lines.append(f"| {task} | {kind} | {name} | " + " | ".join(_fmt(runs)) + f" | {g} |")
    per_seed = [f"{task} {kind}: " + ", ".join(f"seed {s} {run[-1] - run[0]:+.3f}" for s, run in zip(seeds_done, runs))
                for (task, kind, rule), runs in table.items() if rule == "painted+local" and kind != "zero-shot"]
    if per_seed:
        lines += ["", "Per seed, painted+local, +4 − box: " + "; ".join(per_seed) + "."]
    lines += ["", "Rules: " + "; ".join(RULE_TEXT[r] for r in args.rules) + "."]
    answered = answers_lines({f"{task} {model}": runs for (task, model), runs in (answers or {}).items()})
    if answered:
        lines += ["", "Under painted+local: " + answered[0], *answered[1:]]
    lines += ["", "Times: " + "; ".join(notes) + "."]
    if len(done) < len(args.tasks) or len(seeds_done) < len(args.seeds):
        lines += ["", f"**Partial**: tasks done {', '.join(done) or 'none'} of {', '.join(args.tasks)}; seeds done "
                      f"{', '.join(map(str, seeds_done))} of {', '.join(map(str, args.seeds))} (the file is rewritten "
                      "after each seed and each task)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
