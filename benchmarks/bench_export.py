"""Exported graphs vs torch eager on CPU, measured side by side in one run.

    python -m benchmarks.bench_export [--models litemedsam vit_b] [--threads 2] [--repeats 5]

Prints a table of ratios and writes benchmarks/results/export.md: encoder/decoder latency (torch
eager vs onnxruntime, plain and onnxslim-simplified), export time, artefact sizes, parity.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_export.py`
    from _results import Results, weights_source


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, threads: int, repeats: int, work: Path) -> dict:
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.models import load_model
    from medico_peft.runtime.ort_backend import OrtBackend, decoder_feed
    from medico_peft.runtime.preprocess import build_prompt_arrays
    from medico_peft.runtime.torch_backend import TorchBackend

    model = load_model(name)
    res = {"model": name, "img_size": model.img_size, "weights": weights_source(name)}
    metas = {}
    for variant, simplify in (("ort", False), ("ort+slim", True)):
        t0 = time.perf_counter()
        metas[variant] = export_onnx(model, work / f"{name}_{variant}", simplify=simplify, parity_random=2,
                                     parity_real=1, threads=threads)
        res[f"export_s {variant}"] = time.perf_counter() - t0
    s = model.img_size
    img = np.random.default_rng(0).integers(0, 255, (s * 3 // 4, s, 3), dtype=np.uint8)
    coords, labels = build_prompt_arrays(img.shape[:2], box=[10, 10, s // 2, s // 3])
    tb = TorchBackend(model)
    with torch.no_grad():
        from medico_peft.runtime.preprocess import preprocess_image

        x = preprocess_image(torch.from_numpy(img), s, "div255")
        res["encoder torch"] = timed(lambda: model.encode(x), repeats)
        emb = model.encode(x)
        res["decoder torch"] = timed(lambda: tb.decode(emb, coords, labels, None, 0.0, img.shape[:2], False), repeats * 4)
    for variant in metas:
        ob = OrtBackend(work / f"{name}_{variant}", threads=threads)
        xin = x.numpy()
        enc = ob.sessions["encoder"]
        res[f"encoder {variant}"] = timed(lambda: enc.run(None, {"image": xin}), repeats)
        feed = decoder_feed(emb, coords, labels, None, 0.0, img.shape[:2], ob.embedding_size)
        dec = ob.sessions["decoder"]
        res[f"decoder {variant}"] = timed(lambda: dec.run(None, feed), repeats * 4)
        files = metas[variant]["files"]
        res[f"size_mb {variant}"] = sum(f["bytes"] + f.get("external_data", {}).get("bytes", 0)
                                        for f in files.values()) / 1e6
        res[f"parity {variant}"] = metas[variant]["parity"]
    return res


GOAL_SPEEDUP = 2.0


def render(results: list[dict], threads: int, repeats: int) -> str:
    lines = [f"CPU, {threads} threads, median of {repeats}. "
             "Ratios = torch eager time / onnxruntime time (higher is better), measured in the same run.", ""]
    lines += [f"- {r['model']}: {r['weights']}." for r in results]
    lines += ["",
             "| model | part | torch eager (s) | ORT (s) | ORT+onnxslim (s) | speed-up ORT | speed-up ORT+slim |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for part in ("encoder", "decoder"):
            t, a, b = r[f"{part} torch"], r[f"{part} ort"], r[f"{part} ort+slim"]
            lines.append(f"| {r['model']} ({r['img_size']}²) | {part} | {t:.4f} | {a:.4f} | {b:.4f} | "
                         f"{t / a:.2f}× | {t / b:.2f}× |")
    best = max(r["encoder torch"] / min(r["encoder ort"], r["encoder ort+slim"]) for r in results)
    lines += ["", f"Goal: exported encoder ≥ {GOAL_SPEEDUP:g}× faster than torch eager on CPU → "
                  f"{'reached' if best >= GOAL_SPEEDUP else 'not reached'} (best encoder speed-up {best:.2f}×)."]
    lines += ["", "| model | export time ORT (s) | export time ORT+slim (s) | size (MB) | size slim (MB) |",
              "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['export_s ort']:.1f} | {r['export_s ort+slim']:.1f} | "
                     f"{r['size_mb ort']:.1f} | {r['size_mb ort+slim']:.1f} |")
    lines += ["", "Export time includes the parity gate. Size = the ONNX files plus external data.", "",
              "## Parity (max abs error vs torch fp32, onnxruntime CPU; per image, max over prompts)", ""]
    from medico_peft.export.parity import markdown_table

    for r in results:
        rows = r["parity ort+slim"]["rows"]
        lines += [f"### {r['model']}", "", markdown_table(rows, "onnxruntime+slim"), ""]
        summary = [f"{k} ≤ {max(float(row[k]) for row in rows):.1e}" for k in ("end_to_end_logits", "mask_mismatch")
                   if rows and all(k in row for row in rows)]
        if summary:
            lines += [f"Over all {len(dict.fromkeys(row['image'] for row in rows))} images: {', '.join(summary)}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["litemedsam", "vit_b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.md"))
    args = ap.parse_args(argv)
    record = Results("Export benchmark: torch eager vs onnxruntime on CPU",
                     argv=None if argv is None else [__file__, *argv])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(m, args.threads, args.repeats, Path(tmp)) for m in args.models]
    text = render(results, args.threads, args.repeats)
    print(text)
    record.write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
