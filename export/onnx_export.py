"""Export a `MedSam` (with its adapter fused) to ONNX: `encoder.onnx`, `decoder.onnx`, `export.json`.

Uses the legacy TorchScript exporter (`dynamo=False`): the dynamo exporter fails on the decoder
with a variable number of points. Everything is written to a staging folder first and moved
into place in one swap only after the parity gate passes, so a failed export leaves the old folder as it was.

`export_onnx` runs named phases: check the options, prepare the model, trace the encoder, trace
the decoder, optionally simplify, describe the export (the sidecar), gate on parity against the
torch model, then commit the staging folder (sidecar last).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from ..runtime.artifacts import ENGINE_SIDECAR, ONNX_SIDECAR, multimask_modes, write_sidecar
from ..runtime.preprocess import intensity_mode
from ..utils.paths import staged_folder
from .parity import Tolerance, batch_parity, gate, run_parity
from .sidecar import onnx_io
from .wrappers import DecoderWrapper, EncoderWrapper

MIN_OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's 2 GiB cap
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


def _is_export_file(name: str) -> bool:
    """A file an export writes (replaced by a new export), as opposed to anything else in the folder."""
    return name in (ONNX_SIDECAR, ENGINE_SIDECAR) or name.endswith((".onnx", ".onnx.data", ".engine"))


def staging_folder(out: Path):
    """Yield an empty folder beside `out`; on success it replaces `out` whole in one swap (the old
    export stays loadable until then; files an export does not write are kept)."""
    return staged_folder(out, owned=_is_export_file)


def _export_graph(module, args, path: Path, opset: int, input_names, output_names, dynamic_axes,
                  external_data: bool | None) -> None:
    work = path.parent / f".{path.stem}.work"
    work.mkdir()
    raw = work / path.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about tensor→int conversions we avoid on purpose
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    _save_consolidated(raw, path, external_data)
    shutil.rmtree(work)


def _save_consolidated(src: Path, dst: Path, external_data: bool | None) -> None:
    """Re-save with all weights inline, or (large models / on request) in one `<name>.data` file."""
    import onnx

    model = onnx.load(str(src))  # pulls in scattered external tensors if torch wrote any
    size = model.ByteSize() if external_data is None else 0
    if external_data or (external_data is None and size > PROTOBUF_LIMIT):
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _simplify(path: Path) -> None:
    import onnx
    import onnxslim

    external = (path.parent / (path.name + ".data")).exists()
    slim = onnxslim.slim(str(path))
    if external:
        (path.parent / (path.name + ".data")).unlink()
        onnx.save_model(slim, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(slim, str(path))


def _file_info(path: Path) -> dict:
    from ..utils.hashing import sha256_file

    info = {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    data = path.parent / (path.name + ".data")
    if data.exists():
        info["external_data"] = {"name": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}
    return info


def check_options(opset: int, input_dtype: str, max_batch: int = 1, with_preprocess: bool = False) -> None:
    """Refuse an opset without LayerNormalization/dynamic Resize and an unsupported in-graph input dtype."""
    import onnx  # noqa: F401  (fail before any tracing when the `export` extra is missing)
    import onnxruntime  # noqa: F401

    if opset < MIN_OPSET:
        raise ExportError(f"--opset: expected >= {MIN_OPSET} (LayerNormalization, dynamic Resize), got {opset}")
    if input_dtype not in ("uint8", "float32"):
        raise ExportError(f"input_dtype: expected uint8 or float32, got {input_dtype!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch: expected an integer >= 1, got {max_batch!r}")
    if max_batch > 1 and with_preprocess:
        raise ExportError(f"--max-batch {max_batch}: needs an export without --with-preprocess (the in-graph "
                          "preprocessing takes one H×W×3 image of any size, so it has no batch dimension)")


def prepare_model(model):
    """The model as it is traced: in eval mode (dropout off, norms frozen)."""
    return model.eval()


def trace_encoder(model, stage: Path, opset: int, with_preprocess: bool, input_dtype: str, intensity: str,
                  external_data: bool | None, max_batch: int = 1) -> None:
    """`encoder.onnx`: a padded (1, 3, S, S) input — (B, 3, S, S) with a dynamic batch when `max_batch` > 1 —
    or with preprocessing an (H, W, 3) image of any size."""
    s = model.img_size
    enc = EncoderWrapper(model, with_preprocess, intensity)
    if with_preprocess:
        dummy = (torch.randint(0, 255, (s * 3 // 4, s, 3), dtype=torch.uint8) if input_dtype == "uint8"
                 else torch.rand(s * 3 // 4, s, 3))
        enc_axes = {"image": {0: "height", 1: "width"}}
    elif max_batch > 1:  # traced at batch 2 so no reshape can bake in a batch of 1
        dummy = torch.rand(2, 3, s, s)
        enc_axes = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    else:
        dummy, enc_axes = torch.rand(1, 3, s, s), None
    _export_graph(enc, (dummy,), stage / "encoder.onnx", opset, ["image"], ["image_embeddings"], enc_axes,
                  external_data)


def trace_decoder(model, stage: Path, opset: int, mask_outputs: str, external_data: bool | None) -> None:
    """`decoder.onnx`: SAM's ONNX decoder interface with a variable number of points."""
    s, e, c = model.img_size, model.spec.embedding_size, model.spec.prompt_dim
    dec = DecoderWrapper(model, mask_outputs)
    dec_args = (torch.randn(1, c, e, e), torch.tensor([[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]]]),
                torch.tensor([[1.0, 0.0, -1.0]]), torch.zeros(1, 1, 4 * e, 4 * e), torch.tensor([0.0]),
                torch.tensor([float(s) * 0.75, float(s)]))
    dec_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                "masks": {2: "height", 3: "width"}}
    _export_graph(dec, dec_args, stage / "decoder.onnx", opset, DECODER_INPUTS, DECODER_OUTPUTS, dec_axes,
                  external_data)


def simplify_graphs(stage: Path) -> None:
    for name in ("encoder.onnx", "decoder.onnx"):
        _simplify(stage / name)


def describe_export(model, stage: Path, *, opset: int, with_preprocess: bool, input_dtype: str, intensity: str,
                    mask_outputs: str, simplify: bool, adapter_info: dict | None, export_seconds: float,
                    max_batch: int = 1) -> dict:
    """The sidecar (without the parity table): provenance, options, files with sha256, exact graph I/O, versions."""
    import onnx
    import onnxruntime

    from .. import __version__

    spec = model.spec
    return {
        "kind": "onnx",
        "model": {"spec": spec.to_dict(), "embedding_size": spec.embedding_size,
                  "base_sha256": (adapter_info or {}).get("base_sha256") or getattr(model, "base_sha256", None),
                  "merged_sha256": (adapter_info or {}).get("merged_sha256"),
                  "base_source": getattr(model, "base_source", None)},
        "adapter": (adapter_info or {}).get("adapter"),
        "fuse": {k: v for k, v in (adapter_info or {}).items() if k not in ("adapter", "base_sha256")},
        "opset": opset, "with_preprocess": with_preprocess, "input_dtype": input_dtype, "intensity": intensity,
        "mask_outputs": mask_outputs, "simplified": simplify, "max_batch": max_batch,
        "mask_index": "0 = single-mask answer, 1..3 = multimask answers" if mask_outputs == "all" else mask_outputs,
        "files": {"encoder": _file_info(stage / "encoder.onnx"), "decoder": _file_info(stage / "decoder.onnx")},
        "io": {"encoder": onnx_io(stage / "encoder.onnx"), "decoder": onnx_io(stage / "decoder.onnx")},
        "versions": {"medico_peft": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "export_seconds": round(export_seconds, 2),
    }


def gate_parity(model, stage: Path, out: Path, mask_outputs: str, tolerance: Tolerance, parity_random: int,
                parity_real: int, threads: int | None) -> dict:
    """Load the staged folder with onnxruntime (its sidecar must already be written), compare with the torch
    model, raise ExportError beyond `tolerance`; returns the sidecar's parity section."""
    from ..runtime.ort_backend import OrtBackend

    backend = OrtBackend(stage, threads=threads)
    rows = run_parity(model, backend, parity_random, parity_real, multimask_modes(mask_outputs))
    if backend.artifact.max_batch > 1:
        rows.append(batch_parity(model, backend))
    maxima = gate(rows, tolerance, f"ONNX export to {out}")
    return {"backend": "onnxruntime-cpu", "reference": "torch fp32", "tolerance": tolerance.to_dict(),
            "max": maxima, "rows": rows}


def export_onnx(model, out_dir: str | os.PathLike, *, opset: int = MIN_OPSET, with_preprocess: bool = False,
                input_dtype: str = "uint8", mask_outputs: str = "all", simplify: bool = False,
                tolerance: Tolerance | None = None, adapter_info: dict | None = None,
                external_data: bool | None = None, parity_random: int = 4, parity_real: int = 1,
                threads: int | None = None, max_batch: int = 1) -> dict:
    """Export, gate on parity, write atomically; returns the sidecar dict.

    `max_batch` > 1 gives the encoder graph a dynamic batch dimension (several slices per call, e.g. for
    volumes; TensorRT builds its profile up to it); the gate then also compares a batch of two images."""
    check_options(opset, input_dtype, max_batch, with_preprocess)
    tolerance = tolerance or Tolerance()
    model = prepare_model(model)
    out = Path(out_dir)
    t0 = time.perf_counter()
    with staging_folder(out) as stage, torch.no_grad():
        intensity = intensity_mode(model.spec.family, input_dtype)
        trace_encoder(model, stage, opset, with_preprocess, input_dtype, intensity, external_data, max_batch)
        trace_decoder(model, stage, opset, mask_outputs, external_data)
        if simplify:
            simplify_graphs(stage)
        meta = describe_export(model, stage, opset=opset, with_preprocess=with_preprocess, input_dtype=input_dtype,
                               intensity=intensity, mask_outputs=mask_outputs, simplify=simplify,
                               adapter_info=adapter_info, export_seconds=time.perf_counter() - t0,
                               max_batch=max_batch)
        write_sidecar(stage / ONNX_SIDECAR, meta)  # the parity gate loads the staged folder through it
        meta["parity"] = gate_parity(model, stage, out, mask_outputs, tolerance, parity_random, parity_real,
                                     threads)
        write_sidecar(stage / ONNX_SIDECAR, meta)
    return meta
