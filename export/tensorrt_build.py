"""TensorRT engines from an ONNX export folder (TensorRT 10 and 11 Python API).

- The decoder is rebuilt without its full-resolution `masks` output (`strip_full_res_output`):
  that Resize takes its size from `orig_im_size`, which TensorRT would have to treat as a host
  shape tensor. Without it, `orig_im_size` only feeds coordinate arithmetic (an ordinary device
  tensor) and the predictor upscales the low-res logits itself — as it does for every backend.
- TensorRT 11 removed weak typing: networks are strongly typed and the ONNX types decide the
  precision, so fp16/bf16 graphs are converted first (`mixed_precision`). TensorRT 10 uses the
  classic builder flags (FP16/BF16) on the fp32 graph.
- Optimisation profiles cover 1..max_points prompt points; engines refuse to load on another GPU
  or TensorRT version (`runtime.artifacts.check_engine_compat`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ExportError
from ..runtime.artifacts import ENGINE_SIDECAR, ONNX_SIDECAR, PARTS, current_device_info, import_tensorrt, \
    multimask_modes, read_sidecar, sidecar_task, trt_major, write_sidecar
from .parity import Tolerance, batch_parity, gate, run_parity

LOW_RES_OUTPUTS = ("iou_predictions", "low_res_masks")
TOLERANCES = {  # engine vs onnxruntime fp32
    "fp32": Tolerance(embeddings_atol=1e-2, logits_atol=2e-2, iou_atol=1e-2, end_to_end_atol=5e-2, mask_mismatch=5e-3),
    "fp16": Tolerance(embeddings_atol=0.1, logits_atol=0.25, iou_atol=0.05, end_to_end_atol=1.0, mask_mismatch=0.02),
    "bf16": Tolerance(embeddings_atol=0.5, logits_atol=1.0, iou_atol=0.1, end_to_end_atol=2.0, mask_mismatch=0.03),
}


def strip_full_res_output(model, keep_outputs=LOW_RES_OUTPUTS):
    """Copy of the decoder graph with only `keep_outputs`, unused nodes and initializers pruned."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    missing = [o for o in keep_outputs if o not in {x.name for x in g.output}]
    if missing:
        raise ExportError(f"decoder graph has no output {missing[0]!r}; expected the decoder from `export onnx`")
    needed = set(keep_outputs)
    kept = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    outputs = [o for o in g.output if o.name in keep_outputs]
    del g.node[:]
    g.node.extend(kept)
    del g.output[:]
    g.output.extend(outputs)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def decoder_profile(max_points: int, opt_points: int | None = None) -> dict:
    """min/opt/max shapes of the point inputs (points include box corners and the padding point)."""
    if max_points < 1:
        raise ExportError(f"--max-points: expected >= 1, got {max_points}")
    opt = min(opt_points or min(max_points, 4), max_points)
    return {"point_coords": [[1, 1, 2], [1, opt, 2], [1, max_points, 2]],
            "point_labels": [[1, 1], [1, opt], [1, max_points]]}


def encoder_profile(img_size: int, with_preprocess: bool, max_side: int = 4096, max_batch: int = 1) -> dict:
    """The encoder's profile: any H×W×3 image with in-graph preprocessing; 1..max_batch padded images when
    the ONNX encoder has a batch dimension; none (a static 1×3×S×S input) otherwise."""
    if with_preprocess:
        return {"image": [[2, 2, 3], [img_size, img_size, 3], [max_side, max_side, 3]]}
    if max_batch > 1:
        s = img_size
        return {"image": [[1, 3, s, s], [max_batch, 3, s, s], [max_batch, 3, s, s]]}
    return {}


def uses_strong_typing(version: str, precision: str) -> bool:
    """TensorRT >= 11 is always strongly typed; TensorRT 10 uses builder flags for fp16/bf16."""
    return trt_major(version) >= 11


def build_engine(onnx_path: Path, engine_path: Path, precision: str, profile: dict, workspace_gb: float,
                 timing_cache: str | None) -> dict:
    """Parse, configure and build one engine; returns what was used (for the sidecar)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = uses_strong_typing(trt.__version__, precision)
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse this graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    if not strong:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls drift by ~1e-3
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build the {precision} engine (see the log above)")
    from ..utils.atomic import atomic_write_bytes

    atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"strongly_typed": bool(flags), "build_seconds": round(time.perf_counter() - t0, 1)}


def prepare_onnx(src: Path, dst: Path, precision: str, strong: bool, strip: bool) -> None:
    """Copy of the ONNX graph as the builder needs it: low-res decoder, mixed precision when strongly typed."""
    import onnx

    model = onnx.load(str(src))
    if strip:
        model = strip_full_res_output(model)
    if strong and precision in ("fp16", "bf16"):
        from .mixed_precision import convert_to_mixed_precision

        model = convert_to_mixed_precision(model, precision)
    large = model.ByteSize() > 2 * 1024**3 - 64 * 1024**2
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=dst.name + ".data")


def build_engines(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32",
                  max_points: int = 16, workspace_gb: float = 4.0, timing_cache: str | None = None,
                  atol: float | None = None, parity_random: int = 4, parity_real: int = 1) -> dict:
    """encoder.engine + decoder.engine + engine.json in `out_dir`, after a parity check vs onnxruntime."""
    from ..runtime.ort_backend import OrtBackend
    from ..runtime.trt_backend import TrtBackend
    from .onnx_export import staging_folder

    if precision not in TOLERANCES:
        raise ExportError(f"--precision: expected fp32, fp16 or bf16, got {precision!r}")
    if "quantization" in read_sidecar(Path(onnx_dir) / ONNX_SIDECAR):
        raise ExportError(f"{onnx_dir}: an int8 export for onnxruntime on CPU (`--quantize int8`); TensorRT builds "
                          "from an fp32 export (export onnx without --quantize)")
    trt = import_tensorrt()
    device = current_device_info()
    onnx_dir = Path(onnx_dir)
    onnx_meta = read_sidecar(onnx_dir / ONNX_SIDECAR)
    if sidecar_task(onnx_meta, onnx_dir / ONNX_SIDECAR) == "semantic":  # one graph, image → class logits
        from .semantic_export import build_semantic_engine

        return build_semantic_engine(onnx_dir, out_dir, precision, workspace_gb=workspace_gb,
                                     timing_cache=timing_cache, atol=atol, parity_random=parity_random,
                                     parity_real=parity_real)
    strong = uses_strong_typing(trt.__version__, precision)
    spec = onnx_meta["model"]["spec"]
    profiles = {"encoder": encoder_profile(int(spec["img_size"]), bool(onnx_meta["with_preprocess"]),
                                           max_batch=int(onnx_meta.get("max_batch", 1))),
                "decoder": decoder_profile(max_points)}
    tol = TOLERANCES[precision]
    if atol is not None:
        tol = Tolerance(atol, atol, atol, max(atol, tol.end_to_end_atol), tol.mask_mismatch)
    out = Path(out_dir)
    with staging_folder(out) as stage:
        built = {}
        for part in PARTS:
            src = onnx_dir / onnx_meta["files"][part]["name"]
            prepared = stage / f".{part}.prepared.onnx"
            prepare_onnx(src, prepared, precision, strong, strip=(part == "decoder"))
            built[part] = build_engine(prepared, stage / f"{part}.engine", precision, profiles[part], workspace_gb,
                                       timing_cache)
            built[part]["onnx_sha256"] = onnx_meta["files"][part]["sha256"]
            for p in stage.glob(f".{part}.prepared.onnx*"):
                p.unlink()
        meta = {**device, "kind": "tensorrt", "precision": precision, "profiles": profiles, "engines": built,
                "max_points": max_points, "workspace_gb": workspace_gb,
                "onnx": {**{k: onnx_meta[k] for k in ("model", "adapter", "opset", "with_preprocess", "input_dtype",
                                                        "intensity", "mask_outputs")},
                         "max_batch": int(onnx_meta.get("max_batch", 1))}}
        write_sidecar(stage / ENGINE_SIDECAR, meta)
        reference, engines = OrtBackend(onnx_dir), TrtBackend(stage)
        rows = run_parity(reference, engines, parity_random, parity_real, multimask_modes(onnx_meta["mask_outputs"]))
        if engines.max_batch > 1:
            rows.append(batch_parity(reference, engines))
        maxima = gate(rows, tol, f"TensorRT {precision} engines in {out}")
        meta["parity"] = {"reference": "onnxruntime fp32", "tolerance": tol.to_dict(), "max": maxima, "rows": rows}
        write_sidecar(stage / ENGINE_SIDECAR, meta)
    return meta
