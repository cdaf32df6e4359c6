"""Data-stage figures: loader samples/s per worker, shard size per 1000 slices, conversion speed.

Run: .venv/bin/python benchmarks/bench_data.py [--quick] [--out FILE]
Writes benchmarks/results/data.md. Synthetic shards (200 slices with 8 labelled blobs each) at
256² and 1024² for each compression, plus the real Colin27+AAL shards at 256² and 1024².
num_workers=0, so samples/s is what ONE DataLoader worker delivers (n_objects=5, default prompts
and augmentation), for mask_dtype float32 (default) and uint8, measured interleaved and repeated
(median) because the CPU may be shared. Older loaders without `mask_dtype` get float32 only, so
the same script measures a "before" checkout (PYTHONPATH=old/ python benchmarks/bench_data.py --out x.md).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medico_peft.data.convert import convert  # noqa: E402
from medico_peft.data.dataset import SliceDataset  # noqa: E402
from medico_peft.data.manifest import load_manifest  # noqa: E402

try:
    from benchmarks._results import Results  # noqa: E402
except ImportError:  # run as `python benchmarks/bench_data.py`
    from _results import Results  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results" / "data.md"


def synthetic_volume(n_slices: int, size: int = 256, seed: int = 0):
    """A head-like ellipse (smooth tissue texture, mild noise) on a zero background, like an MR/CT
    slice, + 8 ellipses of different ids drifting through the slices.

    The first version added noise to the whole field of view, background included, which made
    1024² shards nearly incompressible (590 MB / 1000 slices with lzf) and unlike real data.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = np.zeros((size, size, n_slices), np.float32)
    label = np.zeros((size, size, n_slices), np.uint8)
    head = ((yy - size / 2) / (size * 0.45)) ** 2 + ((xx - size / 2) / (size * 0.38)) ** 2 <= 1
    centres = rng.uniform(0.3, 0.7, (8, 2)) * size
    for k in range(n_slices):
        img = head * (80 + 10 * np.sin(xx / 9 + k / 7) * np.cos(yy / 11))
        lab = np.zeros((size, size), np.uint8)
        for i, (cy, cx) in enumerate(centres, 1):
            r = size * (0.04 + 0.02 * np.sin(k / 15 + i))
            inside = (yy - cy - 10 * np.sin(k / 20)) ** 2 + (xx - cx) ** 2 <= r * r
            lab[inside], img[inside] = i, 120 + 12 * i
        image[..., k] = (img + rng.normal(0, 1.5, img.shape)) * head  # background stays exactly 0
        label[..., k] = lab
    return image, label


# "none" first: the other rows are relative to it. Older checkouts without Blosc measure what they have.
COMPRESSIONS_MEASURED = tuple(c for c in ("none", "lzf", "gzip", "blosc-lz4", "blosc-zstd")
                              if c in getattr(__import__("medico_peft.data.shard_format", fromlist=["x"]),
                                              "COMPRESSIONS"))
MASK_DTYPES = ("float32", "uint8") if "mask_dtype" in inspect.signature(SliceDataset).parameters else ("float32",)


def loader_rates(manifest, n_items: int, repeats: int = 3) -> dict[str, float]:
    """Median samples/s per mask dtype; dtypes alternate within each repeat so load spikes hit both."""
    sets = {d: SliceDataset(manifest, n_objects=5, verify=False, **({} if d == "float32" else {"mask_dtype": d}))
            for d in MASK_DTYPES}
    rates = {d: [] for d in MASK_DTYPES}
    for ds in sets.values():
        for i in range(5):
            ds[i]  # warm-up: opens the file
    for _ in range(repeats):
        for d, ds in sets.items():
            start = time.perf_counter()
            for i in range(n_items):
                ds[i % len(ds)]
            rates[d].append(n_items / (time.perf_counter() - start))
    return {d: float(np.median(r)) for d, r in rates.items()}


def hdf5_read_ms(manifest_path, n: int = 20) -> float:
    """Median ms to read one slice's image + label straight from the first shard (h5py, no loader):
    for compressed shards this is mostly the HDF5 filter's decompression."""
    import h5py

    from medico_peft.data import shard_format as F

    m = load_manifest(manifest_path)
    times = []
    with h5py.File(m.shard_path(m.shards[0]), "r") as f:
        images, labels = f[F.IMAGES], f[F.LABELS]
        for i in range(min(n, len(images))):
            start = time.perf_counter()
            images[i], labels[i]
            times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))



def measure_shards(report, n_items: int) -> tuple[float, dict]:
    """(MB per 1000 slices, loader rates with the HDF5 read ms/slice) of a converted shard set."""
    m = load_manifest(report.manifest_path)
    mb_per_1000 = sum(e.bytes for e in m.shards) / report.total_samples * 1000 / 2**20
    rate = loader_rates(report.manifest_path, n_items)
    rate["read_ms"] = hdf5_read_ms(report.manifest_path)
    return mb_per_1000, rate

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer slices/items (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results markdown file")
    args = parser.parse_args()
    record = Results("Data stage benchmark")
    n_slices, n_items = (40, 40) if args.quick else (200, 100)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, label = synthetic_volume(n_slices)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp / "syn.nii"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp / "syn_seg.nii"))
        pair = [(tmp / "syn.nii", tmp / "syn_seg.nii")]
        for size in (256, 1024):
            base = {}
            for comp in COMPRESSIONS_MEASURED:
                out = tmp / f"s{size}{comp}"
                report = convert(pair, out, size=size, compression=comp, split="train", empty_share=0.0,
                                 min_area=0, progress=False)
                mb_per_1000, rate = measure_shards(report, n_items)
                base.setdefault("mb", mb_per_1000)
                base.setdefault("rate", rate["float32"])
                rows.append((f"synthetic {size}²", comp, report.total_samples, mb_per_1000,
                             mb_per_1000 / base["mb"], rate, rate["float32"] / base["rate"]))
                print(rows[-1], flush=True)
        try:
            from medico_peft.data.real_data import build_colin27_aal_shards

            conv = {}
            for size in (256, 1024):
                base = {}
                for comp in COMPRESSIONS_MEASURED:
                    start = time.perf_counter()
                    report = build_colin27_aal_shards(tmp / f"colin{size}{comp}", size=size, compression=comp)
                    conv[size, comp] = (report.total_samples, time.perf_counter() - start)
                    mb_per_1000, rate = measure_shards(report, n_items)
                    base.setdefault("mb", mb_per_1000)
                    base.setdefault("rate", rate["float32"])
                    rows.append((f"Colin27+AAL {size}² (loader: train split)", comp, report.total_samples,
                                 mb_per_1000, mb_per_1000 / base["mb"], rate, rate["float32"] / base["rate"]))
                    print(rows[-1], flush=True)
        except Exception as exc:  # mricron-data missing
            print(f"Colin27 skipped: {exc}", file=sys.stderr)
            conv = {}

    rate_cols = " | ".join(f"samples/s, {d} masks" for d in MASK_DTYPES)
    header = (f"| data | compression | slices | MB / 1000 slices | size vs none | {rate_cols} "
              "| speed vs none (float32) | HDF5 read ms / slice | HDF5 read samples/s |\n|---|---|---:|---:|---:|"
              + "---:|" * (len(MASK_DTYPES) + 3))
    lines = [header] + [f"| {d} | {c} | {n} | {mb:.1f} | {mr:.2f} | "
                        + " | ".join(f"{r[k]:.0f}" for k in MASK_DTYPES)
                        + f" | {rr:.2f} | {r['read_ms']:.1f} | {1e3 / max(r['read_ms'], 1e-3):.0f} |"
                        for d, c, n, mb, mr, r, rr in rows]
    conv_lines = [f"| Colin27 {size}² (181 axial slices in, {n} kept) | {c} | {n / s:.0f} slices/s ({s:.2f} s) |"
                  for (size, c), (n, s) in conv.items()]
    text = "\n".join([
        f"Figures are medians of 3 interleaved runs of {n_items} items each, torch threads 1; on a CPU shared "
        "with other jobs (see the header's load average) single runs vary by about ±30 %.",
        "Loader: `SliceDataset(n_objects=5)` default prompts (1 positive point, box jitter 0.025) and "
        "augmentation (flip, rot90, gamma/contrast), `num_workers=0`, i.e. one worker. "
        "Synthetic slices: a smooth head-like ellipse on an exactly-zero background (see `synthetic_volume`). "
        "HDF5 read = median time to read one slice's image + label from the shard with h5py alone (for lzf/gzip "
        "mostly decompression), the floor under any loader; HDF5 read samples/s = 1000 / that. blosc-lz4 and "
        "blosc-zstd are Blosc through hdf5plugin with a Fletcher-32 checksum per chunk (the default shard filter "
        "is blosc-lz4).",
        "",
        *lines,
        "",
        "Conversion throughput (train+test slices written, 1 process; includes reading the .nii.gz):",
        "",
        "| input | compression | throughput |",
        "|---|---|---:|",
        *(conv_lines or ["| Colin27 | — | skipped: mricron-data not found (MEDICO_PEFT_MRICRON) |"]),
        "",
    ])
    record.write(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
