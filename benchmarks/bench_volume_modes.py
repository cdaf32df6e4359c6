"""Which prompt should carry propagation from one slice to the next? Measured, not assumed.

    python -m benchmarks.bench_volume_modes [--structures Thalamus_L Putamen_R ...] [--axis 2]

Zero-shot LiteMedSAM (real weights) through the onnxruntime export, Colin27 T1 + AAL (Debian mricron-data).
For each deep structure: one tight box on the middle slice of its extent along `--axis`, then
`VolumePredictor.segment` propagates with each `prompt_mode`; 3D Dice against the atlas label. Every mode
of a structure reuses the same cached slice embeddings (cache_slices = the whole axis), so only decoders
differ. A second table sweeps `stop_iou` for the default mode. Writes benchmarks/results/volume_modes.md.

CPU budget: per structure ~30-50 slices encoded once (≈ 0.8 s each) plus ~7 decoder passes per slice
(≈ 0.15 s each): about 1.5 minutes of one core per structure on a quiet machine. Run with `nice -n 10`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

try:
    from benchmarks._results import RESULTS_DIR, Results
except ImportError:  # run as `python benchmarks/bench_volume_modes.py`
    from _results import RESULTS_DIR, Results

# (prompt_mode, box_margin in voxels): the derived box grown by the margin on every side
MODES = (("box", 0), ("box", 3), ("box+mask", 0), ("box+mask", 3), ("box+points+mask", 3))
STOP_IOUS = (0.5, 0.7, 0.85)
DEFAULT_STRUCTURES = ("Thalamus_L", "Putamen_R", "Caudate_L")


def aal_ids(names_file: Path) -> dict[str, list[int]]:
    """AAL name → ids; `Cerebellum_L/R` = every `Cerebelum_*_L/R` lobule (the vermis excluded)."""
    ids: dict[str, list[int]] = {}
    for line in names_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            ids[parts[1]] = [int(parts[0])]
            if parts[1].startswith("Cerebelum_"):
                ids.setdefault(f"Cerebellum_{parts[1][-1]}", []).append(int(parts[0]))
    return ids


def load_colin27():
    import nibabel as nib

    from medico_peft.data.real_data import colin27_paths

    image_path, atlas_path, names = colin27_paths()
    img = nib.load(str(image_path))
    atlas = np.asarray(nib.load(str(atlas_path)).dataobj).astype(np.int32)
    return np.asarray(img.dataobj).astype(np.float32), atlas, tuple(float(z) for z in img.header.get_zooms()[:3]), \
        aal_ids(names)


def middle_slice_box(truth: np.ndarray, axis: int) -> tuple[int, list[int], tuple[int, int]]:
    """(middle slice of the object's extent along axis, its tight box, (first, last) slice)."""
    from medico_peft.data.prompts import mask_box

    present = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis)))
    k = int((present[0] + present[-1]) // 2)
    if not np.take(truth, k, axis).any():  # a gap in the middle: the slice with the largest cross-section
        k = int(present[np.argmax([np.take(truth, i, axis).sum() for i in present])])
    return k, mask_box(np.take(truth, k, axis)).tolist(), (int(present[0]), int(present[-1]))


def dice3d(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def export_litemedsam(folder: Path) -> Path:
    if (folder / "export.json").exists():
        return folder
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.models import load_model

    export_onnx(load_model("litemedsam"), folder, parity_random=1, parity_real=0, threads=1)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structures", nargs="+", default=list(DEFAULT_STRUCTURES))
    p.add_argument("--axis", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep-mode", default="box", help="prompt_mode of the stop_iou sweep")
    p.add_argument("--sweep-margin", type=float, default=3, help="box_margin of the stop_iou sweep")
    p.add_argument("--work", default="benchmarks/work/volume", help="where the LiteMedSAM ONNX export is kept")
    p.add_argument("--out", default=str(RESULTS_DIR / "volume_modes.md"))
    args = p.parse_args(argv)
    run = Results("Volume propagation: which prompt carries a mask to the next slice (zero-shot LiteMedSAM)")

    from medico_peft.runtime import Predictor
    from medico_peft.runtime.volume import VolumePredictor

    volume, atlas, spacing, ids = load_colin27()
    onnx_dir = export_litemedsam(Path(args.work) / "litemedsam_onnx")
    predictor = Predictor.from_onnx(onnx_dir, threads=args.threads)
    rows, sweep = [], []
    for name in args.structures:
        if name not in ids:
            raise SystemExit(f"--structures: {name!r} is not an AAL name (see aal.nii.txt) nor Cerebellum_L/R")
        truth = np.isin(atlas, ids[name])
        k, box, (first, last) = middle_slice_box(truth, args.axis)
        vp = VolumePredictor(predictor, cache_slices=volume.shape[args.axis]).set_volume(
            volume, axis=args.axis, spacing=spacing)
        for mode, margin in MODES:
            vp.prompt_mode, vp.box_margin = mode, margin
            t0 = time.perf_counter()
            mask = vp.segment(k, box=box)
            reached = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != args.axis)))
            rows.append(dict(structure=name, mode=(mode, margin), dice=dice3d(mask, truth), first=first, last=last,
                             got=(int(reached[0]), int(reached[-1])) if reached.size else None,
                             seconds=time.perf_counter() - t0))
            print(f"{name:14s} {mode:16s} {margin} Dice {rows[-1]['dice']:.3f} truth {first}..{last} got {rows[-1]['got']}",
                  flush=True)
        vp.prompt_mode, vp.box_margin = args.sweep_mode, args.sweep_margin
        vp.stop_iou = 0.5
        for stop in STOP_IOUS:
            if stop == 0.5 and (args.sweep_mode, args.sweep_margin) in MODES:  # measured above already
                prev = next(r for r in rows if r["structure"] == name and r["mode"] == (args.sweep_mode,
                                                                                          args.sweep_margin))
                sweep.append(dict(structure=name, stop_iou=stop, dice=prev["dice"]))
                continue
            vp.stop_iou = stop
            sweep.append(dict(structure=name, stop_iou=stop, dice=dice3d(vp.segment(k, box=box), truth)))
        print(f"{name:14s} stop_iou sweep {[round(r['dice'], 3) for r in sweep[-len(STOP_IOUS):]]}", flush=True)

    names = list(dict.fromkeys(r["structure"] for r in rows))
    lines = [f"Colin27 T1 + AAL, axis {args.axis}, spacing {spacing} mm; zero-shot LiteMedSAM (real weights) via "
             f"onnxruntime ({args.threads} thread). One tight box on the middle slice of each structure's extent, "
             "then propagation both ways with each prompt mode and box margin (voxels added to each side of the "
             "derived box; stop_iou 0.5, min_area 4). Cell: 3D Dice; "
             "in brackets the slices reached vs the atlas extent.", "",
             "| structure | " + " | ".join(f"{m} margin {g}" for m, g in MODES) + " |", "|---|" + "---:|" * len(MODES)]
    for n in names:
        cells = []
        for m in MODES:
            r = next(r for r in rows if r["structure"] == n and r["mode"] == m)
            got = "none" if r["got"] is None else f"{r['got'][0]}-{r['got'][1]}"
            cells.append(f"{r['dice']:.3f} ({got} vs {r['first']}-{r['last']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    means = {m: float(np.mean([r["dice"] for r in rows if r["mode"] == m])) for m in MODES}
    lines.append("| **mean** | " + " | ".join(f"**{means[m]:.3f}**" for m in MODES) + " |")
    best = max(means, key=means.get)
    lines += ["", f"Best mean 3D Dice: `{best[0]}` with box margin {best[1]} ({means[best]:.3f}).", "",
              f"stop_iou sweep (`{args.sweep_mode}`, margin {args.sweep_margin}):", "",
              "| structure | " + " | ".join(f"stop_iou {s}" for s in STOP_IOUS) + " |",
              "|---|" + "---:|" * len(STOP_IOUS)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['dice']:.3f}" for r in sweep if r["structure"] == n) + " |")
    smeans = [float(np.mean([r["dice"] for r in sweep if r["stop_iou"] == s])) for s in STOP_IOUS]
    lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in smeans) + " |")
    path = run.write(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
