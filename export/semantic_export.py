"""Export a semantic model (`SemanticSam`: a SAM image encoder with merged LoRA + a class head) to one ONNX
graph, image → class logits, behind a parity gate; build its TensorRT engine.

Two graph forms, recorded in the sidecar (`export.json`, `task = "semantic"`):

- `with_preprocess=True`: input `image` (H, W, 3) of any size and aspect ratio (uint8 or float32); the
  graph resizes, normalises and pads like the interactive encoder, runs the model and brings the
  logits back to (1, C, H, W) with the shared upscaler (`logits_at = "original"`).
- `with_preprocess=False` (default, like the interactive export): input `image` (1, 3, S, S), the padded
  model input the runtime prepares; output (1, C, S, S) (`logits_at = "model"`), which the runtime
  crops and resizes with the same upscaler.

The gate compares onnxruntime's logits at the original size with the torch model's (several aspect
ratios and real MNI152 slices): max abs logit error, share of pixels whose label (argmax) differs, and
any NaN/Inf fails it. Nothing is written unless it passes (staging folder swapped in at the end).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..runtime.artifacts import ENGINE_SIDECAR, ONNX_SIDECAR, SEMANTIC_PART, read_onnx_export, require_task, \
    write_sidecar
from ..runtime.preprocess import intensity_mode, preprocess_image
from ..runtime.semantic import logits_to_original
from .sidecar import onnx_io

GRAPH = f"{SEMANTIC_PART}.onnx"


@dataclass
class SemanticTolerance:
    logits_atol: float = 1e-2        # end to end: the whole encoder's error reaches the logits
    label_mismatch: float = 1e-3     # share of pixels whose argmax class differs

    def to_dict(self) -> dict:
        return asdict(self)


TRT_TOLERANCES = {  # engine vs onnxruntime fp32
    "fp32": SemanticTolerance(logits_atol=5e-2, label_mismatch=5e-3),
    "fp16": SemanticTolerance(logits_atol=1.0, label_mismatch=0.02),
    "bf16": SemanticTolerance(logits_atol=2.0, label_mismatch=0.03),
}


def check_semantic_model(model) -> None:
    from ..models.semantic import SemanticSam

    if not isinstance(model, SemanticSam):
        raise ExportError(f"semantic export: expected a SemanticSam (image encoder + class head), got "
                          f"{type(model).__name__}; an interactive model exports with `export_onnx`")


class SemanticWrapper(nn.Module):
    """image → class logits, in one of the two forms described in the module docstring."""

    def __init__(self, model, with_preprocess: bool = False, intensity: str = "minmax"):
        super().__init__()
        self.model = model
        self.with_preprocess = with_preprocess
        self.intensity = intensity
        self.img_size = model.sam.img_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.with_preprocess:
            return self.model(image)
        shape = torch._shape_as_tensor(image)
        logits = self.model(preprocess_image(image, self.img_size, self.intensity))
        return logits_to_original(logits, shape[:2].to(torch.float32), self.img_size)


def trace_semantic(model, stage: Path, opset: int, with_preprocess: bool, input_dtype: str, intensity: str,
                   external_data: bool | None) -> None:
    """`semantic.onnx`: the wrapper traced with the legacy exporter (as the interactive graphs)."""
    from .onnx_export import _export_graph

    s = model.sam.img_size
    wrapper = SemanticWrapper(model, with_preprocess, intensity).eval()
    if with_preprocess:
        dummy = (torch.randint(0, 255, (s * 3 // 4, s, 3), dtype=torch.uint8) if input_dtype == "uint8"
                 else torch.rand(s * 3 // 4, s, 3))
        axes = {"image": {0: "height", 1: "width"}, "logits": {2: "height", 3: "width"}}
    else:
        dummy, axes = torch.rand(1, 3, s, s), None
    _export_graph(wrapper, (dummy,), stage / GRAPH, opset, ["image"], ["logits"], axes, external_data)


def describe_semantic_export(model, stage: Path, *, opset: int, with_preprocess: bool, input_dtype: str,
                             intensity: str, simplify: bool, adapter_info: dict | None,
                             export_seconds: float) -> dict:
    """The sidecar (without the parity table)."""
    import onnx
    import onnxruntime

    from .. import __version__
    from .onnx_export import _file_info

    sam, spec = model.sam, model.sam.spec
    info = adapter_info or {}
    return {
        "kind": "onnx", "task": "semantic",
        "model": {"spec": spec.to_dict(), "embedding_size": spec.embedding_size,
                  "base_sha256": info.get("base_sha256") or getattr(sam, "base_sha256", None),
                  "merged_sha256": info.get("merged_sha256"), "base_source": getattr(sam, "base_source", None)},
        "semantic": {"kind": model.kind, "num_classes": int(model.num_classes),
                     "class_names": [str(n) for n in model.class_names],
                     "logits_at": "original" if with_preprocess else "model",
                     "labels": "argmax over classes; class 0 = background"},
        "adapter": info.get("adapter"),
        "fuse": {k: v for k, v in info.items() if k not in ("adapter", "base_sha256")},
        "opset": opset, "with_preprocess": with_preprocess, "input_dtype": input_dtype, "intensity": intensity,
        "simplified": simplify,
        "files": {SEMANTIC_PART: _file_info(stage / GRAPH)},
        "io": {SEMANTIC_PART: onnx_io(stage / GRAPH)},
        "versions": {"medico_peft": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "export_seconds": round(export_seconds, 2),
    }


def _nonfinite(*arrays) -> int:
    return int(sum(np.count_nonzero(~np.isfinite(np.asarray(a, np.float64))) for a in arrays))


@torch.no_grad()
def run_semantic_parity(reference, backend, n_random: int = 4, n_real: int = 1, seed: int = 0) -> list[dict]:
    """Rows per test image: max |logits − reference| at the original size, share of pixels whose label
    differs, NaN/Inf count in either side. `reference`: a SemanticSam or another semantic backend."""
    from ..runtime.torch_backend import TorchSemanticBackend
    from .parity import gate_input, test_images

    if isinstance(reference, nn.Module):
        reference = TorchSemanticBackend(reference)
    rows = []
    for name, image in test_images(n_random, n_real, seed):
        arr = gate_input(image, backend)
        ref = reference.semantic_logits(arr).float()
        out = backend.semantic_logits(arr).float()
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"parity gate: logits of shape {tuple(out.shape)} for image '{name}', the torch model "
                              f"gives {tuple(ref.shape)}; nothing was written")
        bad = _nonfinite(ref, out)
        err = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
        if bad:
            err = float("nan")
        rows.append({"image": name, "height": arr.shape[0], "width": arr.shape[1], "nonfinite": bad,
                     "logits": err,
                     "label_mismatch": float((out.argmax(1) != ref.argmax(1)).float().mean())})
    return rows


def semantic_gate(rows: list[dict], tol: SemanticTolerance, what: str) -> dict:
    """Raise ExportError naming the worst image beyond tolerance (NaN/Inf fails); otherwise return the maxima."""
    if not rows:
        raise ExportError(f"{what}: parity gate failed: no images were compared; nothing was written")
    maxima = {}
    for key, limit in (("nonfinite", 0), ("logits", tol.logits_atol), ("label_mismatch", tol.label_mismatch)):
        worst = max(rows, key=lambda r: float("inf") if np.isnan(r[key]) else r[key])
        value = worst[key]
        maxima[key] = value
        if not value <= limit:
            where = f"(image '{worst['image']}'); nothing was written"
            if key == "nonfinite" or np.isnan(value):
                raise ExportError(f"{what}: parity gate failed: {worst['nonfinite']} NaN/Inf values in the compared "
                                  f"logits {where}")
            raise ExportError(f"{what}: parity gate failed: {key} max error {value:.3g} > tolerance {limit:g} {where}")
    return maxima


def gate_semantic_parity(model, folder: Path, out: Path, tolerance: SemanticTolerance, parity_random: int,
                         parity_real: int, threads: int | None) -> dict:
    """Load `folder` (sidecar already written) with onnxruntime and gate it against the torch model."""
    from ..runtime.ort_backend import OrtSemanticBackend

    backend = OrtSemanticBackend(folder, threads=threads)
    rows = run_semantic_parity(model, backend, parity_random, parity_real)
    maxima = semantic_gate(rows, tolerance, f"semantic ONNX export to {out}")
    return {"backend": "onnxruntime-cpu", "reference": "torch fp32", "tolerance": tolerance.to_dict(),
            "max": maxima, "rows": rows}


def export_semantic_onnx(model, out_dir: str | os.PathLike, *, opset: int = 17, with_preprocess: bool = False,
                         input_dtype: str = "uint8", simplify: bool = False,
                         tolerance: SemanticTolerance | None = None, adapter_info: dict | None = None,
                         external_data: bool | None = None, parity_random: int = 4, parity_real: int = 1,
                         threads: int | None = None) -> dict:
    """Trace, gate on parity, write `semantic.onnx` + `export.json` atomically; returns the sidecar dict.

    `model` is a SemanticSam with its PEFT already merged (`fuse`); bottleneck adapters stay as ops.
    """
    from .onnx_export import _simplify, check_options, staging_folder

    check_semantic_model(model)
    from ..tuners import is_injected

    if is_injected(model) or is_injected(model.sam):
        raise ExportError("semantic export: the model still carries PEFT modules; fold them first with "
                          "medico_peft.export.fuse.fuse_semantic (or export_semantic_adapter from the adapter file)")
    check_options(opset, input_dtype)
    tolerance = tolerance or SemanticTolerance()
    model = model.eval()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with staging_folder(out) as stage, torch.no_grad():
        intensity = intensity_mode(model.sam.spec.family, input_dtype)
        trace_semantic(model, stage, opset, with_preprocess, input_dtype, intensity, external_data)
        if simplify:
            _simplify(stage / GRAPH)
        meta = describe_semantic_export(model, stage, opset=opset, with_preprocess=with_preprocess,
                                        input_dtype=input_dtype, intensity=intensity, simplify=simplify,
                                        adapter_info=adapter_info, export_seconds=time.perf_counter() - t0)
        write_sidecar(stage / ONNX_SIDECAR, meta)  # the gate loads the staged folder through it
        meta["parity"] = gate_semantic_parity(model, stage, out, tolerance, parity_random, parity_real, threads)
        write_sidecar(stage / ONNX_SIDECAR, meta)
    return meta


def semantic_profile(img_size: int, with_preprocess: bool, max_side: int = 4096) -> dict:
    """Optimisation profile of the semantic engine: any image side 2..max_side with in-graph preprocessing;
    a fixed (1, 3, S, S) input otherwise (no profile needed)."""
    if not with_preprocess:
        return {}
    return {"image": [[2, 2, 3], [img_size, img_size, 3], [max_side, max_side, 3]]}


def semantic_engine_sidecar(onnx_meta: dict, device: dict, precision: str, profiles: dict, built: dict,
                            workspace_gb: float) -> dict:
    """`engine.json` of a semantic engine (before its parity table): the GPU and TensorRT version it is bound
    to, and the ONNX sidecar's model, classes, preprocessing, files and graph I/O it was built from."""
    return {**device, "kind": "tensorrt", "task": "semantic", "precision": precision, "profiles": profiles,
            "engines": built, "workspace_gb": workspace_gb,
            "onnx": {k: onnx_meta[k] for k in ("task", "model", "semantic", "adapter", "opset", "with_preprocess",
                                                 "input_dtype", "intensity", "files", "io")}}


def build_semantic_engine(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32",
                          workspace_gb: float = 4.0, timing_cache: str | None = None, atol: float | None = None,
                          max_side: int = 4096, parity_random: int = 4, parity_real: int = 1) -> dict:
    """`semantic.engine` + `engine.json` in `out_dir` from a semantic ONNX export, after a parity check of the
    engine against onnxruntime (same gate as the export: logits, labels, NaN/Inf)."""
    from ..runtime.artifacts import current_device_info, import_tensorrt
    from ..runtime.ort_backend import OrtSemanticBackend
    from ..runtime.trt_backend import TrtSemanticBackend
    from .onnx_export import staging_folder
    from .tensorrt_build import build_engine, prepare_onnx, uses_strong_typing

    if precision not in TRT_TOLERANCES:
        raise ExportError(f"--precision: expected fp32, fp16 or bf16, got {precision!r}")
    onnx_dir = Path(onnx_dir)
    art = require_task(read_onnx_export(onnx_dir), "semantic")
    trt = import_tensorrt()
    device = current_device_info()
    strong = uses_strong_typing(trt.__version__, precision)
    profiles = {SEMANTIC_PART: semantic_profile(art.img_size, art.with_preprocess, max_side)}
    tol = TRT_TOLERANCES[precision] if atol is None else SemanticTolerance(atol, TRT_TOLERANCES[precision].label_mismatch)
    onnx_meta = art.meta
    out = Path(out_dir)
    with staging_folder(out) as stage:
        prepared = stage / f".{SEMANTIC_PART}.prepared.onnx"
        prepare_onnx(art.part_path(SEMANTIC_PART), prepared, precision, strong, strip=False)
        built = {SEMANTIC_PART: build_engine(prepared, stage / f"{SEMANTIC_PART}.engine", precision,
                                             profiles[SEMANTIC_PART], workspace_gb, timing_cache)}
        built[SEMANTIC_PART]["onnx_sha256"] = onnx_meta["files"][SEMANTIC_PART]["sha256"]
        for p in stage.glob(f".{SEMANTIC_PART}.prepared.onnx*"):
            p.unlink()
        meta = semantic_engine_sidecar(onnx_meta, device, precision, profiles, built, workspace_gb)
        write_sidecar(stage / ENGINE_SIDECAR, meta)
        rows = run_semantic_parity(OrtSemanticBackend(onnx_dir), TrtSemanticBackend(stage), parity_random,
                                   parity_real)
        maxima = semantic_gate(rows, tol, f"TensorRT {precision} semantic engine in {out}")
        meta["parity"] = {"reference": "onnxruntime fp32", "tolerance": tol.to_dict(), "max": maxima, "rows": rows}
        write_sidecar(stage / ENGINE_SIDECAR, meta)
    return meta


def export_semantic_adapter(base_model, adapter: str | os.PathLike, out_dir: str | os.PathLike, **options) -> dict:
    """Load a semantic adapter file onto `base_model` (a plain MedSam; base weights checked), fold its LoRA
    (`fuse_semantic`, merged vs unmerged logits checked) and export with `export_semantic_onnx(**options)`."""
    from ..adapters.semantic import load_semantic_adapter
    from .fuse import fuse_semantic

    model = load_semantic_adapter(base_model, adapter)
    fused, info = fuse_semantic(model, adapter)
    return export_semantic_onnx(fused, out_dir, adapter_info=info, **options)
