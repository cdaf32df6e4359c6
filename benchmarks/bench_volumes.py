"""3D interactive segmentation on real volumes: zero-shot LiteMedSAM vs a LoRA adapter, along each axis.

Data (no download): Colin27 T1 + AAL (1 mm, 181×217×181; by default every 2nd voxel is used, a 2 mm grid
of 91×109×91, to fit the CPU budget), objects = thalamus, caudate, putamen, pallidum,
hippocampus, amygdala and cerebellum (the union of the AAL `Cerebelum_*` hemisphere parcels; vermis left out),
left and right separate (14 objects); and nilearn's MNI152 template (2 mm by default) with its brain mask and
the grey/white-matter labels of data/real_data.py (3 objects).

Protocol (medico_peft.evaluation.volume, = `medico-peft evaluate --3d`): one tight box on each object's
middle slice, propagated through the volume by the VolumePredictor, then 5 corrective rounds (one click on
the slice with the most wrong voxels, in its larger error region); 3D Dice and NSD at 2 mm after the box
and after rounds 1, 3 and 5; along axes 0, 1 and 2 of the NIfTI arrays (sagittal, coronal, axial).

LoRA adapter: the demo's recipe (r=8 on q,v of the last 2 TinyViT blocks + the mask decoder and prompt
encoder, click-trained as evaluated (`workflows/demo.py` `CLICK_TRAINING`), selected on the val slab), trained with the library's Trainer on axial 2D slices of the Colin27
training slab (lowest 50 % of the labelled extent) with every AAL label EXCEPT the 14 evaluated structures' labels (Thalamus, Caudate, Putamen,
Pallidum, Hippocampus, Amygdala, Cerebelum_*): those are held out as objects (their pixels are unlabelled
background during training; the adapter did see the same subject's image). MNI152 is a different image and
label type, held out entirely.

CPU budget (2 cores shared with other jobs): the encoder dominates (LiteMedSAM ~0.7 s/slice in
onnxruntime, ~1.3 s in torch on a quiet core), and only slices an object's propagation reaches are encoded,
once per axis and model (one VolumePredictor per axis and model, embeddings shared by all objects). About
550 slice encodings in all at 2 mm (about twice that at 1 mm: `--colin-step 1 --mni-resolution 1`);
target ≤ 30 min wall under load with the default onnxruntime backend
(both models exported once; the LoRA model merged). `--quick` is a smoke test (2 objects, one axis, 1 round).

    nice -n 10 python benchmarks/bench_volumes.py            # full run -> benchmarks/results/volumes.md
    python benchmarks/bench_volumes.py --quick               # smoke test -> /tmp/volumes_quick.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medico_peft.evaluation import volume as ev
from medico_peft.utils.atomic import atomic_write_text

try:
    from benchmarks._results import Results
except ImportError:  # run as `python benchmarks/bench_volumes.py`
    from _results import Results

HERE = Path(__file__).resolve().parent
TITLE = "3D interactive segmentation on real volumes: LiteMedSAM zero-shot vs LoRA, per axis"
STRUCTURES = {"thalamus": "Thalamus", "caudate": "Caudate", "putamen": "Putamen", "pallidum": "Pallidum",
              "hippocampus": "Hippocampus", "amygdala": "Amygdala", "cerebellum": "Cerebelum_*"}
HELD_OUT_PATTERNS = ["Thalamus_*", "Caudate_*", "Putamen_*", "Pallidum_*", "Hippocampus_*", "Amygdala_*",
                     "Cerebelum_*"]
MNI_OBJECTS = ["brain", "grey_matter", "white_matter"]
AXIS_NAMES = {0: "0 (sagittal)", 1: "1 (coronal)", 2: "2 (axial)"}
REPORT_ROUNDS = (0, 1, 3, 5)


def colin_items(quick: bool) -> list[str]:
    items = [f"{name}_{side}={pattern}_{side}" for name, pattern in STRUCTURES.items() for side in "LR"]
    return ["thalamus_L=Thalamus_L", "putamen_R=Putamen_R"] if quick else items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 Colin27 objects + MNI152 brain, axis 2, "
                                                         "1 round, a few training steps, results to /tmp")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--axes", default="2,0,1", help="axes in run order")
    p.add_argument("--datasets", default="colin27,mni152")
    p.add_argument("--mni-resolution", type=int, default=2, choices=(1, 2))
    p.add_argument("--colin-step", type=int, default=2,
                   help="use every N-th Colin27 voxel (2 = a 2 mm grid, half the slices to encode per axis)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tolerance-mm", type=float, default=2.0)
    p.add_argument("--train-minutes", type=float, default=None,
                   help="optional wall-clock cap on LoRA training (default: none, so the run is bounded by "
                        "--train-steps alone and does not depend on how loaded the CPU is)")
    p.add_argument("--train-steps", type=int, default=40, help="LoRA optimiser steps")
    p.add_argument("--work", default="benchmarks/work/volumes")
    p.add_argument("--out", help="results file (default benchmarks/results/volumes.md; /tmp/volumes_quick.md "
                                 "with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.axes, args.rounds = "2", 1
        args.train_minutes, args.train_steps = min(args.train_minutes or 0.5, 0.5), min(args.train_steps, 3)
    args.out = args.out or ("/tmp/volumes_quick.md" if args.quick else str(HERE / "results" / "volumes.md"))
    args.axes = [int(a) for a in args.axes.split(",")]
    args.datasets = args.datasets.split(",")
    return args


def held_out_ids(names: dict[int, str]) -> list[int]:
    import fnmatch

    return sorted(i for i, n in names.items() if any(fnmatch.fnmatchcase(n, p) for p in HELD_OUT_PATTERNS))


def train_lora(work: Path, args) -> tuple[Path, dict]:
    """Adapter trained on the Colin27 axial training slab, the evaluated structures' labels left out."""
    from medico_peft.data.labels import read_label_names
    from medico_peft.data.real_data import build_colin27_aal_shards, colin27_paths
    from medico_peft.training import TrainConfig, train

    names = read_label_names(colin27_paths()[2])
    held = held_out_ids(names)
    keep = [i for i in sorted(names) if i not in held]
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        print(f"[bench] building Colin27 + AAL shards: {len(keep)} labels, {len(held)} held out", flush=True)
        build_colin27_aal_shards(shards, size=256, labels=keep)
    from medico_peft.workflows.demo import CONSTANT_SCHEDULE, demo_peft_config, lora_config

    # the demo's recipe: LoRA on q, v of the last 2 TinyViT blocks + the mask decoder and prompt encoder,
    # click-trained as evaluated, adapter selected on the val slab (Colin27's own: the slab split of the shards)
    raw = lora_config(shards / "manifest.json", work / "runs" / "lora", 5e-4, demo_peft_config(rank=8, blocks=2),
                      progress=False, max_minutes=args.train_minutes)
    raw["train"]["max_steps"] = args.train_steps
    raw["schedule"] = dict(CONSTANT_SCHEDULE)  # the schedule volumes.md was measured with (a short run)
    cfg = TrainConfig.from_dict(raw)
    cap = f" (capped at {args.train_minutes:g} min)" if args.train_minutes else ""
    print(f"[bench] training LoRA for {args.train_steps} steps{cap}", flush=True)
    result = train(cfg, overwrite=True)  # the benchmark's own work folder
    info = {"steps": len(result.steps), "train_s": result.train_seconds, "max_steps": args.train_steps,
            "max_minutes": args.train_minutes, "held_out": [names[i] for i in held],
            "kept": len(keep), "selected": result.best_step,
            "recipe": f"batch {cfg.train.batch_size} slices × {cfg.data.n_objects} objects, {cfg.train.sub_iterations} "
                      f"click sub-iterations ({cfg.train.prompt} start, click sampling `{cfg.train.click_sampling}`, "
                      f"answer fed back with p = {cfg.train.mask_feed_prob:g}), lr {cfg.optim.lr:g} {cfg.schedule.kind}"}
    return Path(result.adapter_path), info


def make_predictor(model, name: str, work: Path, backend: str):
    from medico_peft.runtime import Predictor

    if backend == "torch":
        return Predictor.from_torch(model)
    from medico_peft.export.onnx_export import export_onnx

    folder = work / "onnx" / name
    t = time.perf_counter()
    export_onnx(model, folder, parity_random=1, parity_real=0, threads=1)
    print(f"[bench] exported {name} to ONNX in {time.perf_counter() - t:.0f} s", flush=True)
    return Predictor.from_onnx(folder, threads=1)


def subsample(vol: ev.VolumeInput, step: int) -> ev.VolumeInput:
    """Every `step`-th voxel along each axis (image and labels alike: the grid stays exact), spacing × step."""
    if step == 1:
        return vol
    cut = (slice(None, None, step),) * 3
    affine = None if vol.affine is None else vol.affine @ np.diag([step, step, step, 1.0])
    return ev.VolumeInput(np.ascontiguousarray(vol.image[cut]), np.ascontiguousarray(vol.labels[cut]),
                          tuple(s * step for s in vol.spacing), affine, vol.label_names,
                          f"{vol.volume_id}_{step}mm" if vol.spacing == (1.0, 1.0, 1.0) else vol.volume_id,
                          {k: np.ascontiguousarray(v[cut]) for k, v in vol.extra_objects.items()})


def volumes(args) -> dict[str, tuple]:
    out = {}
    for data in args.datasets:
        vol = ev.builtin_volume(data, args.mni_resolution if data == "mni152" else 1)
        if data == "colin27":
            vol = subsample(vol, args.colin_step)
        items = colin_items(args.quick) if data == "colin27" else (["brain"] if args.quick else MNI_OBJECTS)
        out[data] = (vol, ev.select_objects(vol, items, data))
    return out


def run_one(label: str, predictor, name: str, vol, objects, axis: int, args, work: Path) -> dict:
    """One model on one volume along one axis: one VolumePredictor, embeddings shared by all objects."""
    from medico_peft.runtime.volume import VolumePredictor

    vp = VolumePredictor(predictor, cache_slices=256)
    res = ev.evaluate_volume(vp, vol.image, objects, axis=axis, spacing=vol.spacing, affine=vol.affine,
                             rounds=args.rounds, tolerance_mm=args.tolerance_mm, volume_id=vol.volume_id,
                             out_dir=work / "eval" / label.replace(" ", "_") / f"{name}_axis{axis}",
                             n_montages=2, progress=False, title=f"{label}: {vol.volume_id}, axis {axis}")
    print(f"[bench] {label} {name} axis {axis}: Dice {res.mean_dice[0]:.3f} -> {res.mean_dice[-1]:.3f}, "
          f"{res.encoded_slices} slices encoded, {res.seconds:.0f} s", flush=True)
    return {"model": label, "data": name, "volume_id": vol.volume_id, "axis": axis, "n": res.n_objects,
            "dice": res.mean_dice, "nsd": res.mean_nsd, "encoded": res.encoded_slices, "decoded": vp.decoded_slices,
            "seconds": res.seconds,
            "objects": {r["object"]: [r[f"dice_{i}"] for i in range(args.rounds + 1)] for r in res.rows}}


def _at(values, i):
    return values[i] if i < len(values) else float("nan")


def write_report(out: Path, rows: list[dict], args, record: Results, train_info: dict | None) -> None:
    shown = [r for r in REPORT_ROUNDS if r <= args.rounds]
    lines = [
        "Protocol: `medico-peft evaluate --3d` (medico_peft/evaluation/volume.py): one tight box on each object's "
        "middle slice along the axis, propagated through the volume (VolumePredictor defaults: "
        f"{_vp_defaults()}), then "
        f"{args.rounds} corrective rounds, each one click on the slice with the most wrong voxels, in its larger "
        f"error region, at that region's deepest pixel. 3D Dice; NSD at {args.tolerance_mm:g} mm using the voxel "
        f"spacing. Backend: {args.backend}, 1 thread.", "",
        f"Objects: Colin27 + AAL ({args.colin_step} mm grid: one voxel in {args.colin_step} along each axis of the 1 mm image and "
        "atlas): thalamus, caudate, putamen, pallidum, hippocampus, amygdala, cerebellum "
        "(union of the AAL Cerebelum_* hemisphere parcels, vermis excluded), L and R separate"
        + (" (quick: 2 objects)" if args.quick else " (14 objects)")
        + f"; MNI152 ({args.mni_resolution} mm, nilearn): brain mask, grey matter, white matter. Axis 0 = sagittal, "
        "1 = coronal, 2 = axial slices of the NIfTI arrays.", "",
    ]
    if train_info:
        lines += [
            "LoRA: the demo's recipe (`workflows/demo.py` `lora_config`: r=8 on q,v of the last 2 TinyViT blocks + "
            f"mask decoder + prompt encoder, {train_info['recipe']}, adapter selected on the val slab), trained with the library Trainer on axial 2D slices of the Colin27 training slab (lowest "
            f"50 % of the labelled extent; val = the next 15 %) for {train_info['steps']} steps "
            f"({train_info['train_s']:.0f} s CPU; `--train-steps` {train_info['max_steps']}"
            + (f", capped at `--train-minutes` {train_info['max_minutes']:g}" if train_info["max_minutes"] else
               ", no time cap") + "; the adapter holds "
            f"step {train_info['selected']}). Held out: the evaluated structures' AAL labels ("
            + ", ".join(train_info["held_out"]) + f") were removed from the training labels ({train_info['kept']} "
            "other AAL labels kept), so these structures were never a training object; the adapter saw the same "
            "subject's image and trained on axial slices only. MNI152 (another image, tissue labels) is entirely "
            "held out.", ""]
    planned = len(args.datasets) * len(args.axes) * 2
    lines += [f"Runs finished: {len(rows)} of {planned} planned (data × axis × model); the file is rewritten after "
              "each run, so fewer means the run was stopped early and the missing rows were not measured.", ""]
    lines += ["| data | axis | model | objects | " + " | ".join("box" if r == 0 else f"+{r}" for r in shown)
              + f" | NSD box | NSD +{args.rounds} | slices encoded | s |",
              "|---|---|---|---:|" + "---:|" * (len(shown) + 4)]
    for r in rows:
        lines.append(f"| {r['volume_id']} | {AXIS_NAMES[r['axis']]} | {r['model']} | {r['n']} | "
                     + " | ".join(f"{_at(r['dice'], i):.3f}" for i in shown)
                     + f" | {r['nsd'][0]:.3f} | {r['nsd'][-1]:.3f} | {r['encoded']} | {r['seconds']:.0f} |")
    models = list(dict.fromkeys(r["model"] for r in rows))
    objects = list(dict.fromkeys(o for r in rows for o in r["objects"]))
    if rows:
        lines += ["", f"Per object, 3D Dice box → +{args.rounds}, mean over the (data, axis) runs (axes {', '.join(map(str, args.axes))}):",
                  "", "| object | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for o in objects:
            cells = []
            for m in models:
                vals = [r["objects"][o] for r in rows if r["model"] == m and o in r["objects"]]
                cells.append("—" if not vals else f"{np.mean([v[0] for v in vals]):.3f} → "
                                                  f"{np.mean([v[-1] for v in vals]):.3f}")
            lines.append(f"| {o} | " + " | ".join(cells) + " |")
        means = {m: [np.mean([_at(r["dice"], i) for r in rows if r["model"] == m]) for i in shown] for m in models}
        lines += ["", "Mean over every (data, axis) row: "
                  + "; ".join(f"{m}: " + ", ".join(f"{'box' if i == 0 else '+' + str(i)} {v:.3f}"
                                                  for i, v in zip(shown, means[m])) for m in models) + "."]
    record.write(out, "\n".join(lines))


def _vp_defaults() -> str:
    """The VolumePredictor defaults this run used, read from its signature (not restated by hand)."""
    import inspect

    from medico_peft.runtime.volume import VolumePredictor

    d = {k: v.default for k, v in inspect.signature(VolumePredictor.__init__).parameters.items()
         if v.default is not inspect.Parameter.empty}
    return (f"prompt_mode {d['prompt_mode']!r} from the previous slice, box margin {d['box_margin']:g} voxels, "
            f"stop below predicted IoU {d['stop_iou']:g} or {d['min_area']} voxels")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    record = Results(TITLE, argv=None if argv is None else [__file__, *argv])
    work = Path(args.work) / ("quick" if args.quick else "full")
    from medico_peft.adapters import load_adapter
    from medico_peft.models import load_model

    data = volumes(args)
    adapter, train_info = train_lora(work, args)
    predictors = {}
    for label in ("zero-shot", "LoRA"):
        model = load_model("litemedsam")
        if label == "LoRA":
            model = load_adapter(model, adapter)
        model.eval()
        predictors[label] = make_predictor(model, label.lower(), work, args.backend)
    rows: list[dict] = []
    # axis outer, then data, models inner: an interrupted run still compares both models on both datasets
    # along the first axes
    for axis in args.axes:
        for name, (vol, objects) in data.items():
            for label, predictor in predictors.items():
                rows.append(run_one(label, predictor, name, vol, objects, axis, args, work))
                atomic_write_text(work / "results.json", json.dumps(rows, indent=2))
                write_report(Path(args.out), rows, args, record, train_info)
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
