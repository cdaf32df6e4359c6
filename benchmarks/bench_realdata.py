"""Real-data benchmark: what each PEFT method buys over decoder-only training, on held-out real slices.

    python -m benchmarks.bench_realdata [--tasks colin27 mni152] [--methods ...] [--seeds 0 1 2]
        [--budgets steps time] [--steps 40] [--minutes 10] [--schedule constant|cosine] [--lr-factors 0.4 1 2]
        [--max-slices 0] [--set loss.click_region=1 ...]
        [--out benchmarks/results/realdata.md]

Tasks (benchmarks/_tasks.py): colin27 (Colin27 T1 + AAL, every structure, hemispheres separate) and mni152 (MNI152
template, grey and white matter), each its own subject, split by axial slab (train lowest 50 %, val next 15 %, test
highest 30 %, 5-slice gaps); the test slab is never trained or validated on.

Every method trains with the recommended recipe (`workflows/demo.py` `lora_config`: batch 2 slices × 2 objects,
click training on the evaluation's own sequence (`CLICK_TRAINING`), the prompt encoder trained, validation on the val
slab every 20 steps selecting the adapter, early stop after 4 validations without a gain); only the PEFT part and the
learning rate differ (`--set section.key=value` changes the recipe of every run, in run folders of their own).
Budgets: `steps` = the same number of optimiser steps for every method (`--steps`); `time` = the
same wall clock (`--minutes`; steps then differ; `--schedule cosine` spreads the cosine over the minutes).
Each method's learning rate: its default (`METHODS`) times the
`--lr-factors` candidate whose seed-`--seeds[0]` run scored best on the val slab (the trainer's selection score:
mean of box Dice and Dice after 3 clicks); that run is reused as the seed's main run.

Evaluation (the library default, `medico-peft evaluate --start box --clicks 4`): one tight box, then 4 clicks at the
centre of the deeper error region, painted into the fed-back logits, the answer kept where the click asked for a
change; Dice at 256² per round, mean over every object of the test slices (`--max-slices 0` = all of them), mean ±
std over seeds. Objects are reported by group (data/real_data.py `object_group`): *visible* (MNI152 tissues, AAL deep
grey nuclei and cerebellum: structures with image edges) and *cortical* (AAL cortical parcels: borders set by atlas
convention). Peak memory = live tensor bytes of one training step at the recipe's shape (`TensorMemoryTracker`:
what `torch.cuda.max_memory_allocated` reports on a GPU).

Why clicks help or not, measured: every test click's answer (`evaluation/clicks.py` `click_response`: the share of the
clicked error region the decoder's answer and the kept answer fix, pixels broken elsewhere), per method, label and
click kind; and per task how much a tight box tells objects apart (`box_overlap`). `--reuse-training` evaluates an
earlier run's adapters again without training them, only where the run's config.yaml is exactly this recipe; the
work folder's results.json keeps every earlier command's trained runs for that (one folder can hold several
seeds). Each evaluation's files (per-object and per-click CSV, summary, overlay PNGs) go to `<work>/<task>/eval/`.

CPU cost (2 quiet cores of the Intel Xeon of the earlier files): ≈ 3–4 s a LoRA step (full finetune ≈ 3× that), and
≈ 6 s a Colin27 test slice (~30 objects) or ≈ 1 s an MNI152 slice to evaluate: one Colin27 method × seed ≈ 3 min
training + 4 min on the 43 test slices. The AMD EPYC of realdata.md is about 2.5× slower (the file ends with every
run's times; ≈ 6 s an MNI152 decoder-only step once the feature cache is warm, ≈ 10 s while it fills in the first
epoch). The whole grid (2 tasks × 10 methods × 3 seeds × 2 budgets + the LR sweep) is a multi-hour run; `--tasks`,
`--methods`, `--seeds`, `--budgets` and `--lr-factors 1` cut it down, and the file says what ran. The results file
is rewritten after every evaluated model (marked partial until the last).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks._answers import answers_lines
    from benchmarks._results import RESULTS_DIR, Results, weights_source
    from benchmarks._step import build, measured_step
    from benchmarks._tasks import TASKS, build_shards
except ImportError:  # run as `python benchmarks/bench_realdata.py`
    from _answers import answers_lines
    from _results import RESULTS_DIR, Results, weights_source
    from _step import build, measured_step
    from _tasks import TASKS, build_shards

TITLE = "Real data: PEFT methods vs decoder-only training, LiteMedSAM on CPU"
CLICKS = 4
# name -> (table label, PeftConfig fields or None for the untrained base, default learning rate). Every trained
# method also trains the mask decoder and the prompt encoder (the recipe), except decoder_lora, whose decoder
# is frozen under LoRA. Encoder PEFT sits in the last 2 TinyViT blocks (the recipe: the frozen prefix is cached)
# unless the label says otherwise.
METHODS = {
    "zero_shot": ("zero-shot LiteMedSAM", None, None),
    "decoder_only": ("decoder only", {"method": "decoder_only", "train_prompt_encoder": True}, 5e-4),
    "decoder_lora": ("LoRA r=8 on the decoder only", {"method": "decoder_only", "decoder_lora": True,
                                                      "train_prompt_encoder": True}, 5e-4),
    "lora_qv": ("LoRA r=8 q,v (last 2 blocks)", {"method": "lora", "rank": 8, "targets": ["q", "v"], "blocks": 2,
                                                 "train_prompt_encoder": True}, 5e-4),
    "lora_qv_all_blocks": ("LoRA r=8 q,v (all blocks)", {"method": "lora", "rank": 8, "targets": ["q", "v"],
                                                         "blocks": "all", "train_prompt_encoder": True}, 5e-4),
    "lora_all_linears": ("LoRA r=8 qkv,proj,mlp (last 2 blocks)", {"method": "lora", "rank": 8,
                                                                   "targets": ["qkv", "proj", "mlp"], "blocks": 2,
                                                                   "train_prompt_encoder": True}, 5e-4),
    "dora": ("DoRA r=8 q,v (last 2 blocks)", {"method": "dora", "rank": 8, "targets": ["q", "v"], "blocks": 2,
                                              "train_prompt_encoder": True}, 5e-4),
    "adapter_parallel": ("Adapter parallel w=64 (last 2 blocks)", {"method": "adapter", "adapter_kind": "parallel",
                                                                   "bottleneck": 64, "blocks": 2,
                                                                   "train_prompt_encoder": True}, 5e-4),
    "adapter_sequential": ("Adapter sequential w=64 (last 2 blocks)", {"method": "adapter",
                                                                       "adapter_kind": "sequential", "bottleneck": 64,
                                                                       "blocks": 2, "train_prompt_encoder": True},
                           5e-4),
    "full": ("full finetune", {"method": "full", "train_prompt_encoder": True}, 1e-4),
}
ENCODER_PEFT = ("lora_qv", "lora_qv_all_blocks", "lora_all_linears", "dora", "adapter_parallel", "adapter_sequential")
BUDGETS = ("steps", "time")
SCHEDULES = ("constant", "cosine")
# issue 14's goals for the best encoder-PEFT method on a task's held-out slab
GOAL_OVER_DECODER, GOAL_TO_FULL, GOAL_BOX, GOAL_CLICKS, GOAL_MINUTES = 0.02, 0.01, 0.85, 0.90, 30.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=tuple(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", default=["steps"], choices=BUDGETS,
                   help="steps: equal optimiser steps; time: equal wall clock")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per run (budget `steps`)")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per run (budget `time`)")
    p.add_argument("--schedule", default="constant", choices=SCHEDULES,
                   help="constant: the recipe's LR after 2 warmup steps (a run the clock ends); cosine: warmup over 5 %% "
                        "of --steps, then cosine down to 5 %% of the LR at the last step; under budget `time` the "
                        "same cosine spread over --minutes (schedule.span: time)")
    p.add_argument("--lr-factors", type=float, nargs="+", default=[1.0],
                   help="learning rates tried per method on the val slab, as multiples of its default")
    p.add_argument("--max-slices", type=int, default=0, help="test slices evaluated, evenly spaced (0: all)")
    p.add_argument("--work", type=Path, default=Path("benchmarks/work/realdata"))
    p.add_argument("--reuse-training", action="store_true",
                   help="evaluate again without training where the work folder's results.json has the run and its "
                        "config.yaml is exactly the recipe this command would train (the report says which)")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="change the recipe of every trained run (the trainer's override syntax, e.g. "
                        "loss.click_region=1); the runs go to their own folders (named after the changes), so the "
                        "recipe's runs in the same work folder are kept, and the report names the changes")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "realdata.md")
    args = p.parse_args(argv)
    if args.steps < 1 or args.minutes <= 0 or args.max_slices < 0 or any(f <= 0 for f in args.lr_factors):
        p.error("--steps and --minutes must be positive, --max-slices ≥ 0, every --lr-factors value > 0")
    for item in args.overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or key.split(".")[0] in ("peft", "output") or key in ("optim.lr", "train.seed"):
            p.error(f"--set {item}: expected section.key=value outside what the benchmark varies itself "
                    "(peft.*, optim.lr, train.seed, output.*)")
    return args


def run_name(method: str, lr: float | None, seed: int, args) -> str:
    """A run's folder name: method, LR and seed, then the --set changes (so they never replace the recipe's run)."""
    changes = "".join(f"+{item}" for item in args.overrides)
    lr_part = "" if lr is None else f"_lr{lr:g}"  # None: the evaluation's folder, named by method and seed
    return f"{method}{lr_part}_seed{seed}{changes}".replace("/", "_")


# --- one run ----------------------------------------------------------------------------------------
def train_config(method: str, manifest: Path, out: Path, lr: float, seed: int, budget: str, args) -> dict:
    """The recommended recipe with this method's PEFT part, learning rate, seed and budget."""
    from medico_peft.training.config import apply_overrides
    from medico_peft.tuners import PeftConfig
    from medico_peft.workflows.demo import CONSTANT_SCHEDULE, cosine_schedule, lora_config

    peft = PeftConfig(**METHODS[method][1])
    raw = lora_config(manifest, out, lr, peft, progress=False,
                      max_minutes=args.minutes if budget == "time" else None)
    raw["train"].update({"seed": seed, "device": "cpu"})
    if budget == "steps":
        raw["train"]["max_steps"] = args.steps
    else:
        raw["train"]["epochs"] = 10_000  # the clock ends the run
    # --schedule cosine: the recipe's (workflows/demo.py cosine_schedule over --steps; under the time budget
    # lora_config's TIME_COSINE, the same cosine over --minutes); constant: the recipe's schedule before
    if args.schedule != "cosine":
        raw["schedule"] = dict(CONSTANT_SCHEDULE)
    elif budget == "steps":
        raw["schedule"] = cosine_schedule(args.steps)
    return apply_overrides(raw, args.overrides)


TRAINED_KEYS = ("adapter", "steps", "train_s", "best_step", "val", "stop")


def reusable_run(previous: dict, out: Path, raw: dict) -> dict | None:
    """The training figures of an earlier run in `out` (from the work folder's results.json, `previous`: adapter
    path -> run) when its adapter exists and its config.yaml equals the recipe `raw` resolves to; else None."""
    import yaml

    from medico_peft.training import TrainConfig

    adapter, config = out / "adapter.safetensors", out / "config.yaml"
    old = previous.get(str(adapter))
    if old is None or not adapter.is_file() or not config.is_file():
        return None
    # both resolved: an option added since the run (at its default) does not make its recipe a different one
    if TrainConfig.from_dict(yaml.safe_load(config.read_text())).to_dict() != TrainConfig.from_dict(raw).to_dict():
        return None
    return {k: old[k] for k in TRAINED_KEYS} | {"reused": True}


def train_run(method: str, manifest: Path, out: Path, lr: float, seed: int, budget: str, args) -> dict:
    from medico_peft.training import TrainConfig, train

    raw = train_config(method, manifest, out, lr, seed, budget, args)
    if args.reuse_training:
        reused = reusable_run(args.previous_runs, out, raw)
        if reused is not None:
            return reused
    result = train(TrainConfig.from_dict(raw), overwrite=True)  # the benchmark's own work folder
    return {"adapter": str(result.adapter_path), "steps": len(result.steps), "train_s": result.train_seconds,
            "best_step": result.best_step, "val": result.best_val_dice, "stop": result.stop_reason}


def adapter_stats(path: Path) -> dict:
    """Parameters stored in the adapter file (= everything trained), MB on disk, share in the mask decoder."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    n = sum(sizes.values())
    decoder = sum(v for k, v in sizes.items() if k.startswith("mask_decoder."))
    return {"params": n, "adapter_mb": path.stat().st_size / 1e6, "decoder_share": decoder / max(1, n)}


def step_peak_bytes(method: str) -> int:
    """Peak live tensor bytes of one training step at the recipe's shape (batch 2, 2 objects, 4 sub-iterations,
    frozen prefix cached), measured with TensorMemoryTracker (benchmarks/_step.py)."""
    from medico_peft.workflows.demo import CLICK_TRAINING

    rig = build("litemedsam", "decoder", batch=2, objects=2, sub_iterations=CLICK_TRAINING["sub_iterations"],
                cache=True, peft_overrides=METHODS[method][1])
    return int(measured_step(rig)["peak"])


def evaluate(model, manifest: Path, args, out_dir: Path | None = None) -> dict:
    """Dice per round over every object of the chosen test slices, overall and per object group; with `out_dir`
    the evaluation's files too (per_object.csv, per_click.csv, summary.md, overlay PNGs)."""
    from medico_peft.data.real_data import object_group
    from medico_peft.evaluation.interactive import evaluate_interactive
    from medico_peft.evaluation.report import click_response_summary

    t = time.perf_counter()
    res = evaluate_interactive(model, manifest, split="test", start="box", n_clicks=CLICKS,
                               max_slices=args.max_slices or None, progress=False, out_dir=out_dir)
    groups: dict[str, list] = {}
    by_slice: dict[int, list] = {}
    for row in res.rows:
        groups.setdefault(object_group(row["label_name"]) or "other", []).append(
            [row[f"dice_{i}"] for i in range(CLICKS + 1)])
        by_slice.setdefault(int(row["slice_index"]), []).append([row["dice_0"], row[f"dice_{CLICKS}"]])
    return {"rounds": res.mean_dice, "n_slices": res.n_slices, "n_objects": res.n_objects,
            "groups": {g: {"rounds": np.mean(v, 0).tolist(), "n": len(v)} for g, v in groups.items()},
            "by_slice": {str(k): np.mean(v, 0).tolist() for k, v in sorted(by_slice.items())},
            "clicks_answered": click_response_summary(res.click_rows), "eval_s": time.perf_counter() - t}


def box_overlap(manifest: Path) -> dict[str, float]:
    """How much a tight box says which object is meant: per object group, the mean over test objects of the
    highest IoU between the object's box and another object's box on the same slice (1 = another object has
    the same box, so the box alone cannot tell them apart)."""
    from medico_peft.data.dataset import iter_eval_slices
    from medico_peft.data.real_data import object_group
    from medico_peft.evaluation.interactive import tight_box

    def iou(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0]) + 1
        h = min(a[3], b[3]) - max(a[1], b[1]) + 1
        inter = max(w, 0) * max(h, 0)
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    best: dict[str, list[float]] = {}
    for item in iter_eval_slices(manifest, split="test", verify=False):
        h, w = item["input_size"]
        label_map = item["label_map"][:h, :w].numpy()
        boxes = {i: tight_box(label_map == i) for i in item["label_ids"]}
        for i, box in boxes.items():
            others = [iou(box, b) for j, b in boxes.items() if j != i]
            group = object_group(item["label_names"][i]) or "other"
            best.setdefault(group, []).append(max(others, default=0.0))
    return {g: float(np.mean(v)) for g, v in best.items()}


# --- the grid --------------------------------------------------------------------------------------
def run_task(task: str, args, state: dict, save) -> None:
    from medico_peft.adapters import load_adapter
    from medico_peft.data.real_data import describe_slabs
    from medico_peft.models import load_model

    work = args.work / task
    manifest = build_shards(task, work / "shards")
    info = state.setdefault("tasks", {}).setdefault(task, {"split": describe_slabs(manifest), "runs": [],
                                                           "box_overlap": box_overlap(manifest)})
    runs = info["runs"]

    def record(method, budget, seed, lr, trained, scores):
        runs.append({"method": method, "budget": budget, "seed": seed, "lr": lr, **trained, **scores})
        save()

    if "zero_shot" in args.methods:
        record("zero_shot", None, None, None, {},
               evaluate(load_model("litemedsam").eval(), manifest, args, work / "eval" / "zero_shot"))
    trained_methods = [m for m in args.methods if METHODS[m][1] is not None]
    for method in trained_methods:
        state.setdefault("peak", {}).setdefault(method, step_peak_bytes(method))
    for budget in args.budgets:
        for method in trained_methods:
            default_lr = METHODS[method][2]
            first, later = args.seeds[0], args.seeds[1:]
            sweep = {}
            for factor in args.lr_factors:  # seed `first` at every candidate; the best on val is its main run
                lr = default_lr * factor
                sweep[lr] = train_run(method, manifest, work / budget / run_name(method, lr, first, args), lr,
                                      first, budget, args)
            lr = max(sweep, key=lambda k: (sweep[k]["val"] if sweep[k]["val"] is not None else -1.0, -abs(k - default_lr)))
            info.setdefault("sweeps", []).append({"method": method, "budget": budget, "seed": first, "chosen": lr,
                                                  "val": {f"{k:g}": v["val"] for k, v in sweep.items()}})
            for seed in [first, *later]:
                trained = sweep[lr] if seed == first else train_run(
                    method, manifest, work / budget / run_name(method, lr, seed, args), lr, seed, budget, args)
                model = load_adapter(load_model("litemedsam"), trained["adapter"]).eval()
                scores = evaluate(model, manifest, args, work / "eval" / budget / run_name(method, None, seed, args))
                record(method, budget, seed, lr, {**trained, **adapter_stats(Path(trained["adapter"]))}, scores)
                print(f"[bench_realdata] {task} {budget} {method} seed {seed} lr {lr:g}: box "
                      f"{scores['rounds'][0]:.3f}, +{CLICKS} {scores['rounds'][-1]:.3f} "
                      f"({trained['steps']} steps, {trained['train_s']:.0f} s train, {scores['eval_s']:.0f} s eval)",
                      flush=True)


def previous_runs(path: Path) -> dict[str, dict]:
    """adapter path -> run of an earlier results.json (read before this run rewrites it): its own runs and those it
    kept from commands before it; {} when there is none."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    runs = [r for info in old.get("tasks", {}).values() for r in info["runs"]] + old.get("kept", [])
    return {r["adapter"]: r for r in runs if r.get("adapter")}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(2)
    record = Results(TITLE, None if argv is None else [__file__, *argv])
    args.work.mkdir(parents=True, exist_ok=True)
    earlier = previous_runs(args.work / "results.json")
    args.previous_runs = earlier if args.reuse_training else {}
    state: dict = {"done": False}

    def save():
        # the work folder's results.json keeps the trained runs of earlier commands that this one has not recorded
        # again (other seeds, methods, schedules), so a later --reuse-training still finds their adapters
        recorded = {r.get("adapter") for info in state.get("tasks", {}).values() for r in info["runs"]}
        state["kept"] = [r for adapter, r in earlier.items() if adapter not in recorded]
        (args.work / "results.json").write_text(json.dumps(state, indent=1))
        record.write(args.out, report(state, args))

    for task in args.tasks:
        run_task(task, args, state, save)
    state["done"] = True
    save()
    print(f"[bench_realdata] wrote {args.out}")
    return 0


# --- the report ------------------------------------------------------------------------------------
def _ms(values: list[float], digits: int = 3, sign: str = "") -> str:
    """mean ± std over seeds (just the value for one seed); sign "+" to sign the mean."""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{np.mean(values):{sign}.{digits}f} ± {np.std(values):.{digits}f}"


def summarise(runs: list[dict], budget: str | None) -> dict[str, dict]:
    """Per method (in run order) for one budget (zero-shot under every budget): its runs' figures by seed."""
    out: dict[str, dict] = {}
    for r in runs:
        if r["budget"] not in (budget, None):
            continue
        s = out.setdefault(r["method"], {"runs": []})
        s["runs"].append(r)
    for s in out.values():
        rs = s["runs"]
        s["box"] = [r["rounds"][0] for r in rs]
        s["clicks"] = [r["rounds"][-1] for r in rs]
        s["rounds"] = np.mean([r["rounds"] for r in rs], 0).tolist()
        s["group"] = {g: (np.mean([r["groups"][g]["rounds"] for r in rs if g in r["groups"]], 0).tolist(),
                          rs[0]["groups"][g]["n"]) for g in rs[0]["groups"]}
    return out


def goal_line(summary: dict) -> str:
    dec, full = summary.get("decoder_only"), summary.get("full")
    enc = {m: s for m, s in summary.items() if m in ENCODER_PEFT}
    if not enc or dec is None:
        return "Goals: not judged (needs decoder only and at least one encoder-PEFT method in the run)."
    best_m = max(enc, key=lambda m: np.mean(enc[m]["box"]))
    best = enc[best_m]
    gain = np.mean(best["box"]) - np.mean(dec["box"])
    apart = min(best["box"]) > max(dec["box"])
    seeds = len(best["box"]) > 1 and len(dec["box"]) > 1
    checks = [(f"≥ {GOAL_OVER_DECODER} box over decoder only with seed ranges apart", gain >= GOAL_OVER_DECODER
               and apart and seeds, f"{gain:+.3f}, ranges {'apart' if apart else 'overlap'}"
               + ("" if seeds else ", one seed: spread unknown"))]
    if full is not None:
        to_full = np.mean(full["box"]) - np.mean(best["box"])
        checks.append((f"within {GOAL_TO_FULL} of full finetune", to_full <= GOAL_TO_FULL, f"full − best {to_full:+.3f}"))
    else:
        checks.append((f"within {GOAL_TO_FULL} of full finetune", False, "full finetune not run"))
    vis = best["group"].get("visible")
    visible_goal = f"≥ {GOAL_BOX} box and ≥ {GOAL_CLICKS} after {CLICKS} clicks on visible structures"
    if vis is None:
        checks.append((visible_goal, False, "no visible structure on this test slab"))
    else:
        checks.append((visible_goal, vis[0][0] >= GOAL_BOX and vis[0][-1] >= GOAL_CLICKS,
                       f"{vis[0][0]:.3f} / {vis[0][-1]:.3f}"))
    minutes = max(r["train_s"] for r in best["runs"]) / 60
    checks.append((f"≤ {GOAL_MINUTES:g} min of training", minutes <= GOAL_MINUTES, f"{minutes:.1f} min"))
    met = all(ok for _, ok, _ in checks)
    parts = "; ".join(f"{what}: {'met' if ok else 'NOT met'} ({why})" for what, ok, why in checks)
    return f"Goals for the best encoder-PEFT method ({METHODS[best_m][0]}, by mean box Dice): {parts} → " \
           f"{'all met' if met else 'not all met'}."


def _method_row(method: str, s: dict, dec: dict | None, peak: int | None) -> str:
    r0 = s["runs"][0]
    gain = [c - b for b, c in zip(s["box"], s["clicks"])]
    delta = "—" if dec is None or method == "decoder_only" else f"{np.mean(s['box']) - np.mean(dec['box']):+.3f}"
    if METHODS[method][1] is None:
        cells = ["—"] * 7
    else:
        cells = [f"{r0['lr']:g}", f"{r0['params']:,}", f"{100 * r0['decoder_share']:.1f} %", f"{r0['adapter_mb']:.1f}",
                 f"{peak / 2**20:.0f}" if peak else "—", "/".join(str(r["steps"]) for r in s["runs"]),
                 _ms([r["train_s"] for r in s["runs"]], 0)]
    return (f"| {METHODS[method][0]} | " + " | ".join(cells)
            + f" | {_ms(s['box'])} | {_ms(s['clicks'])} | {_ms(gain, sign='+')} | {delta} |")


def slab_position_lines(summary: dict) -> list[str]:
    """Box / +CLICKS Dice by position in the test slab: its slices in three equal runs by index (mean over the
    objects of those slices, then over seeds). Where a slab split makes the test anatomy differ from training,
    this is where it shows."""
    rows = []
    for m, s in summary.items():
        runs = [r["by_slice"] for r in s["runs"] if r.get("by_slice")]
        if not runs:
            continue
        slices = sorted(int(k) for k in runs[0])
        thirds = [part for part in np.array_split(np.array(slices), 3) if len(part)]
        cells = []
        for part in thirds:
            vals = np.mean([[run[str(i)] for i in part] for run in runs], axis=(0, 1))
            cells.append(f"{vals[0]:.3f} / {vals[1]:.3f}")
        rows.append((m, thirds, cells))
    if not rows:
        return []
    head = " | ".join(f"slices {p[0]}–{p[-1]}" for p in rows[0][1])
    return ["", f"Dice by position in the test slab (box / +{CLICKS}; its slices in three runs by index, mean over "
            "their objects, then over seeds):", "", f"| method | {head} |", "|---|" + "---:|" * len(rows[0][1])] + [
        f"| {METHODS[m][0]} | " + " | ".join(cells) + " |" for m, _, cells in rows]


def report(state: dict, args) -> str:
    from medico_peft.workflows.demo import TIME_COSINE, cosine_schedule

    budgets_text = {"steps": f"{args.steps} optimiser steps", "time": f"{args.minutes:g} min of training"}
    cosine = cosine_schedule(args.steps)
    cosine_text = {"steps": f"warmup over {cosine['warmup_steps']} steps, then cosine to "
                            f"{100 * cosine['min_lr_ratio']:g} % of the LR at step {cosine['total_steps']}",
                   "time": f"warmup over {TIME_COSINE['warmup_steps']} steps, then cosine to "
                           f"{100 * TIME_COSINE['min_lr_ratio']:g} % of the LR at {args.minutes:g} min "
                           "(`schedule.span: time`)"}
    schedule = ("constant LR after 2 warmup steps" if args.schedule == "constant" else
                "; ".join(f"{budgets_text[b]}: {cosine_text[b]}" if len(args.budgets) > 1 else cosine_text[b]
                          for b in args.budgets))
    lines = [
        f"LiteMedSAM ({weights_source('litemedsam')}). Every trained method: the recommended recipe "
        "(`workflows/demo.py` `lora_config`: batch 2 slices × 2 objects, click training on the evaluation's sequence, "
        "prompt encoder trained, adapter selected on the val slab every 20 steps)"
        + (f" changed by `{' '.join(args.overrides)}` (`--set`)" if args.overrides else "")
        + ", only the PEFT part and the "
        f"learning rate differ; schedule: {schedule}; seeds {', '.join(map(str, args.seeds))}; budgets: "
        + ", ".join(budgets_text[b] for b in args.budgets) + ". Learning rate: the method's default × the best of "
        f"{', '.join(f'{f:g}' for f in args.lr_factors)} on the val slab (seed {args.seeds[0]}). Evaluation: the test slab, "
        f"{'every slice' if not args.max_slices else f'{args.max_slices} evenly spaced slices'}, one tight box then "
        f"{CLICKS} corrective clicks (library default: painted, local merge); Dice at 256², mean over objects, "
        "mean ± std over seeds. *Peak MB* = live tensor bytes of one training step at the recipe's shape "
        "(TensorMemoryTracker, = `max_memory_allocated` on a GPU). *Decoder share* = part of the trained parameters "
        "in the mask decoder. *Δ box* = box Dice − decoder only's (means).", ""]
    if not state.get("done"):
        lines += ["**Partial**: the run is still going or was cut short; the tables hold what finished.", ""]
    for task, info in state.get("tasks", {}).items():
        lines += [f"## {task}", "", "Split (axial slices): " + info["split"].replace("\n", "; "), ""]
        if info.get("box_overlap"):
            lines += ["Box prompts: mean over test objects of the highest IoU between the object's tight box and "
                      "another object's box on the same slice (1 = the box alone cannot tell them apart): "
                      + ", ".join(f"{g} {v:.3f}" for g, v in info["box_overlap"].items()) + ".", ""]
        for budget in args.budgets:
            summary = summarise(info["runs"], budget)
            if not summary:
                continue
            dec = summary.get("decoder_only")
            lines += [f"### {budgets_text[budget]} per run", "",
                      f"| method | lr | trainable params | decoder share | adapter MB | peak MB | steps | train s | "
                      f"box Dice | +{CLICKS} clicks | +{CLICKS} − box | Δ box |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for m, s in summary.items():
                lines.append(_method_row(m, s, dec, state.get("peak", {}).get(m)))
            lines += ["", f"Dice per corrective round (mean over seeds) and by object group (box / +{CLICKS}):", "",
                      "| method | " + " | ".join(f"round {i}" for i in range(CLICKS + 1))
                      + " | rises every round | visible | cortical |", "|---|" + "---:|" * (CLICKS + 1) + "---|---:|---:|"]
            for m, s in summary.items():
                rises = all(b >= a for a, b in zip(s["rounds"], s["rounds"][1:]))
                groups = [f"{s['group'][g][0][0]:.3f} / {s['group'][g][0][-1]:.3f} ({s['group'][g][1]})"
                          if g in s["group"] else "—" for g in ("visible", "cortical")]
                lines.append(f"| {METHODS[m][0]} | " + " | ".join(f"{v:.3f}" for v in s["rounds"])
                             + f" | {'yes' if rises else 'no'} | " + " | ".join(groups) + " |")
            lines += slab_position_lines(summary)
            per_seed = [f"{METHODS[m][0]}: " + ", ".join(f"seed {r['seed']} {r['rounds'][0]:.3f} / {r['rounds'][-1]:.3f}"
                                                         for r in s["runs"])
                        for m, s in summary.items() if METHODS[m][1] is not None and len(s["runs"]) > 1]
            if per_seed:
                lines += ["", f"Per seed (box / +{CLICKS}): " + "; ".join(per_seed) + "."]
            selected = [f"{METHODS[m][0]} seed {r['seed']}: step {r['best_step']} of {r['steps']}, val score {r['val']:.3f}"
                        for m, s in summary.items() for r in s["runs"] if r.get("val") is not None]
            if selected:
                lines += ["", "Adapters kept (the step with the best val-slab score, mean of box and +3-click Dice on the "
                          "recipe's val slices; compare with the test Dice above): " + "; ".join(selected) + "."]
            lines += ["", goal_line(summary), ""]
            lines += answers_lines({METHODS[m][0]: [r.get("clicks_answered", []) for r in s["runs"]]
                                    for m, s in summary.items()})
            reused = [f"{r['method']} seed {r['seed']}" for m in summary.values() for r in m["runs"] if r.get("reused")]
            if reused:
                lines += ["Training reused from the work folder's earlier run (`--reuse-training`: adapter and "
                          "training figures of a run whose config.yaml is exactly this recipe; evaluated anew): "
                          + ", ".join(reused) + ".", ""]
        sweeps = [s for s in info.get("sweeps", []) if len(s["val"]) > 1]
        if sweeps:
            lines += ["Learning-rate choice on the val slab (selection score: mean of box and +3-click Dice of the "
                      "selected step):", "", "| method | budget | val score per lr | chosen |", "|---|---|---|---:|"]
            for s in sweeps:
                vals = ", ".join(f"{lr}: {v:.3f}" if v is not None else f"{lr}: —" for lr, v in s["val"].items())
                lines.append(f"| {METHODS[s['method']][0]} | {s['budget']} | {vals} | {s['chosen']:g} |")
            lines.append("")
        if info["runs"]:
            first = info["runs"][0]
            times = []
            for r in info["runs"]:
                name = r["method"] + ("" if r["seed"] is None else f" seed {r['seed']} ({r['budget']})")
                times.append(f"{name}: {r.get('train_s', 0):.0f} / {r['eval_s']:.0f}")
            lines += [f"Test objects: {first['n_objects']} on {first['n_slices']} slices. Times (s, train / evaluate): "
                      + "; ".join(times) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
