"""GPU check: parity and latency of torch fp32 / bf16 autocast / torch.compile / onnxruntime / TensorRT.

    bash benchmarks/gpu_check.sh                      # on a fresh H100/H200
    python -m benchmarks.gpu_check --cpu-dry-run      # logic check on CPU (tiny model, few repeats)

Then the semantic path (`--semantic-models`, default litemedsam): a class-head model exported to one
ONNX graph and built into TensorRT engines, `predict_semantic` latency and label agreement per backend.

Prints one table: per model and backend, encoder and decoder latency (median) and the max
abs logit error / mask mismatch vs torch fp32. Steps that cannot run (no CUDA EP, no TensorRT)
are reported as skipped with the reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/gpu_check.py`
    from _results import Results, weights_source


def median_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder_input(model, img: np.ndarray) -> torch.Tensor:
    """The padded (1, 3, S, S) encoder input with the model's own intensity preprocessing (min-max for
    LiteMedSAM, /255 for SAM on uint8), exactly as the Predictor's torch backend prepares it."""
    from medico_peft.runtime.preprocess import intensity_mode, preprocess_image

    return preprocess_image(torch.from_numpy(img), model.img_size, intensity_mode(model.spec.family, img.dtype))


def check_model(name: str, device: str, repeats: int, work: Path, do_compile: bool, precisions) -> list[dict]:
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.models import load_model
    from medico_peft.runtime import Predictor
    from medico_peft.runtime.preprocess import build_prompt_arrays

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = load_model(name).to(device).eval()
    s = model.img_size
    img = np.random.default_rng(0).integers(0, 255, (s * 3 // 4, s, 3), dtype=np.uint8)
    box = [0.2 * s, 0.1 * s, 0.7 * s, 0.6 * s]
    coords, labels = build_prompt_arrays(img.shape[:2], box=box)
    x = encoder_input(model, img).to(device)
    ref = Predictor.from_torch(load_model(name).eval()).set_image(img).predict(box=box)  # CPU fp32 reference
    rows = []

    def torch_row(label, encode_fn, decode_model):
        from medico_peft.runtime.torch_backend import torch_decode

        with torch.no_grad():
            enc_t = median_time(encode_fn, repeats, sync)
            emb = encode_fn()
            dec_t = median_time(lambda: torch_decode(decode_model, emb, coords, labels, orig_hw=img.shape[:2]),
                                repeats, sync)
            low, _ = torch_decode(decode_model, emb, coords, labels, orig_hw=img.shape[:2])
        rows.append(_row(name, label, enc_t, dec_t, low.float().cpu(), ref, s))

    torch_row(f"torch fp32 ({device})", lambda: model.encode(x), model)
    if device == "cuda":
        def bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.encode(x).float()
        torch_row("torch bf16 autocast", bf16, model)
    if do_compile:
        compiled = torch.compile(model.image_encoder)
        torch_row("torch.compile encoder", lambda: compiled(model.normalize(x)), model)
        if device == "cuda":
            def bf16_compiled():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(model.normalize(x)).float()
            torch_row("torch bf16 + compile encoder", bf16_compiled, model)

    skip = onnx_not_needed(device)
    if skip:  # the export and CPU onnxruntime rows would only cost minutes of the device's time
        return rows + [{"model": name, "backend": "onnxruntime + TensorRT (export)", "skipped": skip}]
    onnx_dir = work / f"{name}_onnx"
    export_onnx(load_model(name), onnx_dir, parity_random=2, parity_real=1)
    import onnxruntime as ort

    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                 if "CUDAExecutionProvider" in ort.get_available_providers() and device == "cuda"
                 else ["CPUExecutionProvider"])
    ort_label = f"onnxruntime {providers[0].replace('ExecutionProvider', '')}"
    if providers[0].startswith("CUDA"):
        ort_label += " + IO binding"
    rows.append(_predictor_row(name, ort_label, Predictor.from_onnx(onnx_dir, providers=providers), img, box,
                               coords, labels, repeats, ref, s, sync))
    ref_volume = volume_reference(name)
    rows.append(_volume_row(name, ort_label, Predictor.from_onnx(onnx_dir, providers=providers), ref_volume))
    for precision in precisions:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            rows.append({"model": name, "backend": f"tensorrt {precision}", "skipped": "tensorrt not installed (pip install tensorrt); engines also need a CUDA GPU"})
            continue
        if device != "cuda":
            rows.append({"model": name, "backend": f"tensorrt {precision}", "skipped": "TensorRT engines need a CUDA GPU; none here"})
            continue
        try:
            from medico_peft.export.tensorrt_build import build_engines

            build_engines(onnx_dir, work / f"{name}_{precision}", precision=precision, max_points=8,
                          timing_cache=str(work / "timing.cache"), parity_random=1, parity_real=1)
            p = Predictor.from_tensorrt(work / f"{name}_{precision}")
            rows.append(_predictor_row(name, f"tensorrt {precision}", p, img, box, coords, labels, repeats, ref, s,
                                       sync))
            rows.append(_volume_row(name, f"tensorrt {precision}", p, ref_volume))
            if precision == precisions[-1]:  # the decoder replayed from a CUDA graph, on the last precision
                p = Predictor.from_tensorrt(work / f"{name}_{precision}", cuda_graph=True)
                rows.append(_predictor_row(name, f"tensorrt {precision} + CUDA graph", p, img, box, coords, labels,
                                           repeats, ref, s, sync))
        except Exception as exc:  # report and continue: one failing precision must not hide the rest
            traceback.print_exc()
            rows.append({"model": name, "backend": f"tensorrt {precision}", "skipped": f"failed: {exc}"[:120]})
    if device == "cuda" and name == "litemedsam" and "fp16" in precisions:
        rows.append(_batch_row(name, work, img, repeats, sync))
    return rows


def onnx_not_needed(device: str) -> str | None:
    """On a GPU machine with neither onnxruntime's CUDA provider nor TensorRT, the reason to skip the ONNX export
    (its rows would be CPU onnxruntime timings, which export.md measures on the CPU machine); else None."""
    if device != "cuda":
        return None
    import onnxruntime as ort

    try:
        import tensorrt  # noqa: F401
        return None
    except ImportError:
        pass
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return ("no onnxruntime CUDA provider (onnxruntime-gpu not installed) and no TensorRT on this machine: "
            "nothing GPU-side to run from the ONNX graph")


def _batch_row(name, work: Path, img, repeats, sync, batch: int = 8) -> dict:
    """Encoder time per slice when `batch` slices go through one TensorRT fp16 call (the volume path)."""
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.export.tensorrt_build import build_engines
    from medico_peft.models import load_model
    from medico_peft.runtime.trt_backend import TrtBackend

    label = f"tensorrt fp16, encoder batch {batch} (ms per slice)"
    try:
        export_onnx(load_model(name), work / f"{name}_onnx_b{batch}", parity_random=1, parity_real=0,
                    max_batch=batch)
        build_engines(work / f"{name}_onnx_b{batch}", work / f"{name}_fp16_b{batch}", precision="fp16",
                      max_points=8, timing_cache=str(work / "timing.cache"), parity_random=1, parity_real=0)
        b = TrtBackend(work / f"{name}_fp16_b{batch}")
        images = [img] * batch
        per_slice = median_time(lambda: b.encode_batch(images), repeats, sync) / batch
        single = median_time(lambda: b.encode(img), repeats, sync)
        return {"model": name, "backend": label, "encoder_ms": 1e3 * per_slice, "decoder_ms": float("nan"),
                "end_to_end_ms": None, "max_logit_err": float("nan"), "mask_mismatch": 0.0,
                "note": f"batch 1: {1e3 * single:.2f} ms"}
    except Exception as exc:  # report and continue
        traceback.print_exc()
        return {"model": name, "backend": label, "skipped": f"failed: {exc}"[:120]}


VOLUME_SHAPE = (16, 96, 128)


def _ball_volume():
    z, y, x = np.mgrid[:VOLUME_SHAPE[0], :VOLUME_SHAPE[1], :VOLUME_SHAPE[2]]
    ball = (z - 8) ** 2 + (y - 48) ** 2 + (x - 60) ** 2 <= 7 ** 2
    return (ball * 200.0 + 20 + np.random.default_rng(0).normal(0, 5, VOLUME_SHAPE)).astype(np.float32)


def _segment_volume(predictor):
    """VolumePredictor over `predictor` (the same code for every backend): a box on the middle slice, then one
    correction; (mask, seconds per decoded slice)."""
    from medico_peft.runtime.volume import VolumePredictor

    vp = VolumePredictor(predictor, stop_iou=0.0, min_area=1).set_volume(_ball_volume(), axis=0)
    t0 = time.perf_counter()
    vp.segment(8, box=[50, 38, 70, 58])
    mask = vp.correct(10, points=[[60, 48]], labels=[1])
    return mask, (time.perf_counter() - t0) / max(vp.decoded_slices, 1)


def volume_reference(name: str):
    from medico_peft.models import load_model
    from medico_peft.runtime import Predictor

    return _segment_volume(Predictor.from_torch(load_model(name).eval()))[0]  # CPU fp32


def _volume_row(name, label, predictor, ref_mask):
    """VolumePredictor on a synthetic 16-slice ball volume: ms per decoded slice (encoder column, encoding
    included) and the share of voxels that differ from the CPU torch fp32 volume."""
    mask, per_slice = _segment_volume(predictor)
    return {"model": name, "backend": f"{label} volume (ms/slice)", "encoder_ms": 1e3 * per_slice,
            "decoder_ms": float("nan"), "max_logit_err": float("nan"),
            "mask_mismatch": float((mask != ref_mask).mean())}


def _predictor_row(name, label, predictor, img, box, coords, labels, repeats, ref, s, sync=lambda: None):
    """Latency of the backend's encoder, decoder (on the embeddings where the backend keeps them: on the GPU for
    TensorRT and onnxruntime CUDA) and end to end (encode + decode + upscale + masks back on the host, no cache);
    errors on what `predict` returns (for onnxruntime the graph's own full-resolution logits, for TensorRT the
    low-res logits through the shared upscaler)."""
    from medico_peft.runtime.predictor import decode_at_original_size

    b = predictor.backend
    enc_t = median_time(lambda: b.encode(img), repeats, sync)
    emb = b.encode(img)
    dec_t = median_time(lambda: b.decode(emb, coords, labels, None, 0.0, img.shape[:2], False), repeats, sync)
    e2e_t = median_time(lambda: decode_at_original_size(b, b.encode(img), coords, labels, None, 0.0, img.shape[:2],
                                                        False), repeats, sync)
    logits = predictor.set_image(img).predict(box=box).logits
    return _row(name, label, enc_t, dec_t, None, ref, s, logits=logits, e2e_t=e2e_t)


def _row(name, label, enc_t, dec_t, low, ref, s, logits=None, e2e_t=None):
    from medico_peft.runtime.preprocess import upscale_masks

    if logits is None:
        logits = upscale_masks(low, torch.tensor(ref.logits.shape[-2:], dtype=torch.float32), s)[0].numpy()
    return {"model": name, "backend": label, "encoder_ms": 1e3 * enc_t, "decoder_ms": 1e3 * dec_t,
            "end_to_end_ms": None if e2e_t is None else 1e3 * e2e_t,
            "max_logit_err": float(np.abs(logits - ref.logits).max()),
            "mask_mismatch": float(((logits > 0) != ref.masks).mean())}


def check_semantic(name: str, device: str, repeats: int, work: Path, precisions) -> list[dict]:
    """Semantic path: a random UNETR head on `name` (weights as `load_model` gives them), exported to one ONNX graph
    (image → class logits, with its parity gate), run by onnxruntime and built into TensorRT engines per precision
    (their gate vs onnxruntime). Errors vs the torch fp32 CPU model: max abs logit error, share of pixels whose
    label differs. Latency = `Predictor.predict_semantic` end to end (preprocessing, graph, upscaling, argmax)."""
    from medico_peft.export.semantic_export import export_semantic_onnx
    from medico_peft.models import load_model
    from medico_peft.models.semantic import build_semantic
    from medico_peft.runtime import Predictor

    names = ["background", "class_1", "class_2", "class_3"]

    def model():
        torch.manual_seed(0)
        return build_semantic(load_model(name), "unetr", len(names), names).eval()

    cpu_model = model()
    s = cpu_model.img_size
    img = np.random.default_rng(1).integers(0, 255, (s * 3 // 4, s), dtype=np.uint8)
    ref = Predictor.from_torch(cpu_model).predict_semantic(img)
    rows = []

    def row(label, predictor, sync):
        t = median_time(lambda: predictor.predict_semantic(img), repeats, sync)
        out = predictor.predict_semantic(img)
        rows.append({"model": name, "backend": label, "ms": 1e3 * t,
                     "max_logit_err": float(np.abs(out.logits - ref.logits).max()),
                     "label_mismatch": float((out.labels != ref.labels).mean())})

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row(f"torch fp32 ({device})", Predictor.from_torch(model().to(device)), sync)
    skip = onnx_not_needed(device)
    if skip:
        return rows + [{"model": name, "backend": "onnxruntime + TensorRT (export)", "skipped": skip}]
    onnx_dir = work / f"{name}_semantic_onnx"
    export_semantic_onnx(cpu_model, onnx_dir, parity_random=1, parity_real=1)
    row("onnxruntime CPU", Predictor.from_onnx(onnx_dir), lambda: None)
    for precision in precisions:
        label = f"tensorrt {precision}"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            rows.append({"model": name, "backend": label, "skipped": "tensorrt not installed (pip install tensorrt); engines also need a CUDA GPU"})
            continue
        if device != "cuda":
            rows.append({"model": name, "backend": label, "skipped": "TensorRT engines need a CUDA GPU; none here"})
            continue
        try:
            from medico_peft.export.tensorrt_build import build_engines

            build_engines(onnx_dir, work / f"{name}_semantic_{precision}", precision=precision,
                          timing_cache=str(work / "timing.cache"), parity_random=1, parity_real=1)
            row(label, Predictor.from_tensorrt(work / f"{name}_semantic_{precision}"), lambda: None)
        except Exception as exc:  # report and continue: one failing precision must not hide the rest
            traceback.print_exc()
            rows.append({"model": name, "backend": label, "skipped": f"failed: {exc}"[:160]})
    return rows


def semantic_table(rows: list[dict]) -> str:
    out = ["| model | backend | predict_semantic ms | max logit err | label mismatch |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r['backend']} | skipped: {r['skipped']} | | |")
        else:
            out.append(f"| {r['model']} | {r['backend']} | {r['ms']:.2f} | {r['max_logit_err']:.2e} | "
                       f"{r['label_mismatch']:.2e} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| model | backend | encoder ms | decoder ms | end to end ms | max logit err | mask mismatch |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r['backend']} | skipped: {r['skipped']} | | | | |")
        else:
            e2e = "" if r.get("end_to_end_ms") is None else f"{r['end_to_end_ms']:.2f}"
            out.append(f"| {r['model']} | {r['backend']} | {r['encoder_ms']:.2f} | {r['decoder_ms']:.2f} | {e2e} | "
                       f"{r['max_logit_err']:.2e} | {r['mask_mismatch']:.2e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model on CPU: checks the script's logic")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--semantic-models", nargs="*",
                    help="models for the semantic (class-head) export check; default litemedsam on GPU, vit_tiny in "
                         "the dry run; give none to skip it")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    record = Results("GPU check: parity and latency per backend", argv=None if argv is None else [__file__, *argv])
    if args.cpu_dry_run:
        device, models, repeats = "cpu", args.models or ["vit_tiny"], args.repeats or 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible; use --cpu-dry-run to check the logic on CPU")
        device, models, repeats = "cuda", args.models or ["litemedsam", "vit_b"], args.repeats or 20
    semantic_models = args.semantic_models if args.semantic_models is not None else (
        ["vit_tiny"] if args.cpu_dry_run else ["litemedsam"])
    rows, sem_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows += check_model(name, device, repeats, Path(tmp), not args.no_compile, args.precisions)
            print(table(rows), flush=True)  # so far: a run cut short by its time limit still shows these
        for name in semantic_models:
            sem_rows += check_semantic(name, device, repeats, Path(tmp), args.precisions)
    text = table(rows)
    if sem_rows:
        text += ("\n\nSemantic export (random UNETR head, 4 classes; image 3:4; errors vs torch fp32 on CPU):\n\n"
                 + semantic_table(sem_rows))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU dry run"
    print(f"\n{gpu}, torch {torch.__version__}\n{text}")
    if args.out:
        weights = "\n".join(f"- {m}: {weights_source(m)}." for m in models)
        record.write(args.out, f"Device: {gpu}. Latency = median of {repeats} runs; errors vs torch fp32 on CPU "
                               "(max abs logit error, share of mask pixels that differ).\n\n"
                               f"{weights}\n\n{text}\n")
    bad = [r for r in rows if "skipped" not in r and r["mask_mismatch"] > 0.05]
    bad += [r for r in sem_rows if "skipped" not in r and r["label_mismatch"] > 0.05]
    for r in rows:
        if r.get("note"):
            print(f"{r['model']} {r['backend']}: {r['note']}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
