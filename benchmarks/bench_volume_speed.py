"""Time to segment one structure through a 181-slice volume on CPU: onnxruntime and torch side by side.

    python -m benchmarks.bench_volume_speed [--structure Putamen_R] [--axis 2] [--threads 1]

Colin27 T1 (181 × 217 × 181, 1 mm) + AAL; zero-shot LiteMedSAM (real weights). For each backend, in one
run: a cold `VolumePredictor.segment` from a tight box on the structure's middle slice (every slice the
propagation reaches is encoded, then decoded), then one correction (a negative click on the slice with the
largest false-positive area, else a positive one on the largest false negative) on the already-encoded volume:
its time per re-decoded slice, and a check that no slice was re-encoded. Writes
benchmarks/results/volume_speed.md.

CPU budget: ~40 slices × (torch encoder ~1.3 s + decoder ~0.9 s, onnxruntime ~0.75 s + ~0.15 s) plus the
one-off ONNX export (~40 s, kept in --work): about 3 minutes of one core on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._results import RESULTS_DIR, Results
    from benchmarks.bench_volume_modes import dice3d, export_litemedsam, load_colin27, middle_slice_box
except ImportError:  # run as `python benchmarks/bench_volume_speed.py`
    from _results import RESULTS_DIR, Results
    from bench_volume_modes import dice3d, export_litemedsam, load_colin27, middle_slice_box


def correction_click(mask: np.ndarray, truth: np.ndarray, axis: int) -> tuple[int, list, list]:
    """(slice, [[x, y]], [label]) at the deepest pixel of the largest error region of the worst slice."""
    from medico_peft.data.prompts import deepest_pixel

    others = tuple(a for a in range(3) if a != axis)
    fp, fn = mask & ~truth, truth & ~mask
    err = (fp | fn).sum(axis=others)
    k = int(np.argmax(err))
    fps, fns = np.take(fp, k, axis), np.take(fn, k, axis)
    region, label = (fps, 0) if fps.sum() >= fns.sum() else (fns, 1)
    r, c, _ = deepest_pixel(region)
    return k, [[c, r]], [label]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structure", default="Putamen_R")
    p.add_argument("--axis", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--work", default="benchmarks/work/volume")
    p.add_argument("--out", default=str(RESULTS_DIR / "volume_speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Results("Volume segmentation speed on CPU: onnxruntime vs torch (LiteMedSAM, Colin27)")

    from medico_peft.models import load_model
    from medico_peft.runtime import Predictor
    from medico_peft.runtime.volume import VolumePredictor

    volume, atlas, spacing, ids = load_colin27()
    truth = np.isin(atlas, ids[args.structure])
    k, box, (first, last) = middle_slice_box(truth, args.axis)
    onnx_dir = export_litemedsam(Path(args.work) / "litemedsam_onnx")
    backends = {"onnxruntime": lambda: Predictor.from_onnx(onnx_dir, threads=args.threads),
                "torch": lambda: Predictor.from_torch(load_model("litemedsam"))}
    rows = []
    for name, make in backends.items():
        vp = VolumePredictor(make(), cache_slices=volume.shape[args.axis])
        vp.set_volume(volume, axis=args.axis, spacing=spacing)
        t0 = time.perf_counter()
        mask = vp.segment(k, box=box)
        seg_s = time.perf_counter() - t0
        encoded, decoded = vp.encoded_slices(), vp.decoded_slices
        ck, pts, labs = correction_click(mask, truth, args.axis)
        vp.decoded_slices = 0
        t0 = time.perf_counter()
        corrected = vp.correct(ck, points=pts, labels=labs)
        corr_s = time.perf_counter() - t0
        rows.append(dict(backend=name, seg_s=seg_s, encoded=encoded, decoded=decoded, dice=dice3d(mask, truth),
                         corr_s=corr_s, corr_decoded=vp.decoded_slices, corr_encoded=vp.encoded_slices() - encoded,
                         dice_after=dice3d(corrected, truth), click=(ck, pts[0], labs[0]),
                         batch=vp.batch_slices))
        r = rows[-1]
        print(f"{name}: segment {seg_s:.1f} s ({encoded} encoded, {decoded} decoded), correction {corr_s:.2f} s "
              f"over {r['corr_decoded']} slices", flush=True)

    n = volume.shape[args.axis]
    lines = [f"Colin27 T1 ({' × '.join(map(str, volume.shape))}, {n} slices along axis {args.axis}), AAL "
             f"`{args.structure}` (atlas extent slices {first}-{last}); zero-shot LiteMedSAM (real weights), "
             f"prompt: tight box on slice {k}, default VolumePredictor settings, {args.threads} thread(s), CPU. "
             "Slices are encoded lazily: only those the propagation reaches (plus the look-ahead of a batch).", "",
             "| backend | encoder batch | segment s / volume | slices encoded | slices decoded | s / decoded slice "
             "| 3D Dice | correction s | slices re-decoded | s / re-decoded slice | re-encoded | Dice after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = r["corr_s"] / max(r["corr_decoded"], 1)
        lines.append(f"| {r['backend']} | {r['batch']} | {r['seg_s']:.1f} | {r['encoded']} | {r['decoded']} | "
                     f"{r['seg_s'] / max(r['decoded'], 1):.2f} | {r['dice']:.3f} | {r['corr_s']:.2f} | "
                     f"{r['corr_decoded']} | {per:.2f} | {r['corr_encoded']} | {r['dice_after']:.3f} |")
    ort, tor = rows[0], rows[1]
    lines += ["", f"Per volume of {n} slices: onnxruntime {ort['seg_s']:.1f} s, torch {tor['seg_s']:.1f} s "
              f"(torch/onnxruntime {tor['seg_s'] / ort['seg_s']:.2f}×). A correction round on the encoded volume "
              f"(click {'positive' if ort['click'][2] else 'negative'} on slice {ort['click'][0]}) re-runs decoders "
              f"only: {ort['corr_s'] / max(ort['corr_decoded'], 1):.2f} s per affected slice with onnxruntime, "
              f"{tor['corr_s'] / max(tor['corr_decoded'], 1):.2f} s with torch."]
    path = run.write(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
