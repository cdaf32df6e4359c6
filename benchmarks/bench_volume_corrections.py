"""How far should a 3D correction re-propagate? The VolumePredictor's `repropagate` rule, measured by ablation.

    python -m benchmarks.bench_volume_corrections [--axes 2,0,1] [--rounds 5] [--colin-step 2]

Zero-shot LiteMedSAM (real weights, torch, 1 thread), Colin27 T1 + AAL on the 2 mm grid of bench_volumes.py
(14 objects: thalamus, caudate, putamen, pallidum, hippocampus, amygdala, cerebellar hemisphere; L and R). Per
object and axis: the 3D protocol of `medico-peft evaluate --3d` (one tight box on the middle slice, propagated,
then `--rounds` corrective rounds, each one click on the slice with the most wrong voxels, in its larger error
region), once per `repropagate` mode; the modes differ only in what a correction re-propagates:
  - always: from the corrected slice both ways, up to the next prompted slice, even when the correction left
    the corrected slice as it was (the behaviour before the rule);
  - to_anchor: the same, but nothing when the corrected slice did not change;
  - nearest (library default): as to_anchor, and towards another prompted slice only halfway to it.
Every mode of an axis reuses the same cached slice embeddings (one VolumePredictor per axis, cache = the whole
axis), so only decoders differ. Writes benchmarks/results/volume_corrections.md.

CPU budget: ~40-60 slices encoded per object and axis once (~1.3 s each in torch on one quiet core), decoders
~0.2 s per slice per mode. Measured with two or three other benchmarks on the 2 cores: axis 2 13 min, axis 0
29 min, axis 1 41 min (83 min in all; a quiet machine was not measured). Run with `nice -n 10`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

try:
    from benchmarks._results import RESULTS_DIR, Results
    from benchmarks.bench_volumes import AXIS_NAMES, colin_items, subsample
except ImportError:  # run as `python benchmarks/bench_volume_corrections.py`
    from _results import RESULTS_DIR, Results
    from bench_volumes import AXIS_NAMES, colin_items, subsample

MODES = ("always", "to_anchor", "nearest")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--axes", default="2,0,1", help="axes in run order")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--colin-step", type=int, default=2, help="every N-th Colin27 voxel (2 = the 2 mm grid)")
    ap.add_argument("--objects", nargs="+", help="a subset of the 14 (e.g. thalamus_L putamen_R)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "volume_corrections.md"))
    args = ap.parse_args(argv)
    import torch

    from medico_peft.evaluation import volume as ev
    from medico_peft.models import load_model
    from medico_peft.runtime import Predictor
    from medico_peft.runtime.volume import VolumePredictor

    torch.set_num_threads(1)
    res = Results("3D corrections: how far a correction re-propagates (ablation, zero-shot LiteMedSAM, Colin27)", argv)
    vol = subsample(ev.builtin_volume("colin27"), args.colin_step)
    items = colin_items(False)
    if args.objects:
        items = [i for i in items if i.split("=")[0] in args.objects]
    objects = ev.select_objects(vol, items, "colin27")
    predictor = Predictor.from_torch(load_model("litemedsam").eval())
    axes = [int(a) for a in args.axes.split(",")]
    dice: dict[tuple[int, str, str], list[float]] = {}
    seconds = {}
    for axis in axes:
        vp = VolumePredictor(predictor, cache_slices=max(vol.image.shape)).set_volume(vol.image, axis=axis,
                                                                                   spacing=vol.spacing)
        t0 = time.monotonic()
        for name, gt in objects.items():
            for mode in MODES:
                vp.repropagate = mode
                trace = ev.run_volume_protocol(vp, gt, axis=axis, spacing=vol.spacing, rounds=args.rounds)
                dice[(axis, name, mode)] = trace.dice
                print(f"[bench] axis {axis} {name} {mode}: " + " ".join(f"{d:.3f}" for d in trace.dice), flush=True)
        seconds[axis] = time.monotonic() - t0
        res.write(args.out, report(args, axes, objects, dice, seconds, vol))
    print(f"wrote {args.out}")
    return 0


def report(args, axes, objects, dice, seconds, vol) -> str:
    done = [a for a in axes if a in seconds]
    rounds = args.rounds
    lines = [
        f"Colin27 T1 + AAL on a {args.colin_step} mm grid ({'×'.join(map(str, vol.image.shape))} voxels), "
        f"{len(objects)} objects ({', '.join(objects)}); zero-shot LiteMedSAM (real weights), torch, 1 thread. "
        "Protocol: `medico-peft evaluate --3d` (one tight box on the object's middle slice along the axis, "
        f"propagated with the VolumePredictor defaults, then {rounds} corrective rounds: one click on the slice with "
        "the most wrong voxels, in its larger error region, at its deepest pixel). Only `repropagate` differs: "
        "always = after every correction, re-propagate from the corrected slice both ways up to the next prompted "
        "slice (the behaviour before the rule); to_anchor = not when the corrected slice kept its result; "
        "nearest (default) = as to_anchor, and towards another prompted slice only halfway to it. 3D Dice, mean "
        "over objects.", "",
        "| axis | repropagate | box | " + " | ".join(f"+{r}" for r in range(1, rounds + 1))
        + f" | +{rounds} − box | objects that lose Dice by +{rounds} |",
        "|---|---|---:|" + "---:|" * rounds + "---:|---:|",
    ]
    for axis in done:
        for mode in MODES:
            runs = np.array([dice[(axis, o, mode)] for o in objects])
            mean = runs.mean(0)
            lost = int((runs[:, -1] < runs[:, 0] - 1e-9).sum())
            name = f"**{mode}**" if mode == "nearest" else mode
            lines.append(f"| {AXIS_NAMES[axis]} | {name} | " + " | ".join(f"{v:.3f}" for v in mean)
                         + f" | {mean[-1] - mean[0]:+.3f} | {lost} of {len(objects)} |")
    if len(done) > 1:
        for mode in MODES:
            runs = np.array([dice[(a, o, mode)] for a in done for o in objects])
            mean = runs.mean(0)
            lost = int((runs[:, -1] < runs[:, 0] - 1e-9).sum())
            lines.append(f"| all {len(done)} axes | {mode} | " + " | ".join(f"{v:.3f}" for v in mean)
                         + f" | {mean[-1] - mean[0]:+.3f} | {lost} of {len(runs)} |")
    lines += ["", f"Per object, 3D Dice box → +{rounds}, mean over axes {', '.join(map(str, done))}:", "",
              "| object | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for o in objects:
        cells = []
        for mode in MODES:
            runs = np.array([dice[(a, o, mode)] for a in done])
            cells.append(f"{runs[:, 0].mean():.3f} → {runs[:, -1].mean():.3f}")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    lines += ["", "Times (all modes of an axis, encoding included): "
              + "; ".join(f"axis {a}: {seconds[a]:.0f} s" for a in done) + "."]
    if len(done) < len(axes):
        lines += ["", f"**Partial**: axes done {', '.join(map(str, done))} of {', '.join(map(str, axes))} (the file is "
                      "rewritten after each axis)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
