"""The exported-artefact contract, owned by the reader: what `medico-peft export` writes and the runtime loads.

An ONNX export folder holds `encoder.onnx`, `decoder.onnx` and the sidecar `export.json`, which records
where the graphs came from (model spec, base sha256, adapter sha256), their exact inputs/outputs and the
parity table. A TensorRT folder holds `encoder.engine`, `decoder.engine` and `engine.json`, which adds
the TensorRT version and the GPU the engines were built for, because a serialized engine only runs there.

This module defines the sidecar names and format version, the mask-output table, reading a sidecar into
a typed `ExportedModel`, and the checks that refuse mismatched files (graph inputs/outputs, engine
GPU/TensorRT version, engine profiles). `medico_peft.export` writes through it; the runtime never imports
the exporter. Nothing heavy is imported at module level (torch and tensorrt only inside functions).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError
from ..utils.atomic import atomic_write_text

ONNX_SIDECAR = "export.json"
ENGINE_SIDECAR = "engine.json"
FORMAT_VERSION = 1
PARTS = ("encoder", "decoder")
# What an export computes, recorded in its sidecar as "task" (absent: "interactive", the original format).
# An interactive export is an image encoder + prompt decoder pair; a semantic export is one graph,
# image → per-class logits (`SEMANTIC_PART`). Each backend refuses the other task's folder.
TASKS = ("interactive", "semantic")
SEMANTIC_PART = "semantic"
LOGITS_AT = ("original", "model")  # semantic graph output: at the image's own size, or at the model's S×S input

# Which of SAM's four mask tokens the exported decoder returns (index 0 = the single-mask answer,
# 1..3 = the multimask answers), by the `mask_outputs` recorded in the sidecar ...
MASK_OUTPUTS = {"all": slice(0, None), "single": slice(0, 1), "multi": slice(1, None)}
# ... and, for each, which of the decoder's outputs answer `multimask=False` / `multimask=True`
# (a missing key: that export cannot answer it).
MASK_SLICES = {"all": {False: slice(0, 1), True: slice(1, None)}, "single": {False: slice(0, None)},
               "multi": {True: slice(0, None)}}

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(float16)": "float16", "tensor(bool)": "bool"}


def multimask_modes(mask_outputs: str) -> tuple[bool, ...]:
    """The `multimask` values a decoder exported with `mask_outputs` can answer, e.g. (False, True) for "all"."""
    return tuple(MASK_SLICES[mask_outputs])


@dataclass(frozen=True)
class ExportedModel:
    """A sidecar read into typed fields. `meta` is the whole sidecar as written (including parity rows).

    For a TensorRT folder the model fields come from the ONNX sidecar copied into `engine.json`
    (`meta["onnx"]`), and `profiles` holds the engines' optimisation profiles.
    """

    folder: Path
    kind: str                 # "onnx" or "tensorrt"
    family: str
    img_size: int
    embedding_size: int
    with_preprocess: bool
    input_dtype: str
    mask_outputs: str
    meta: dict = field(repr=False)
    max_batch: int = 1        # images per encoder call (>1 only for exports without in-graph preprocessing)
    pixel_mean: tuple = (0.0, 0.0, 0.0)  # [0, 1] units; the padding colour that normalises to 0
    profiles: dict = field(default_factory=dict, repr=False)
    task: str = "interactive"
    semantic: dict = field(default_factory=dict, repr=False)  # semantic exports: kind, num_classes, class_names, ...

    @property
    def sidecar(self) -> Path:
        return self.folder / (ENGINE_SIDECAR if self.kind == "tensorrt" else ONNX_SIDECAR)

    @property
    def parts(self) -> tuple[str, ...]:
        """The graphs (ONNX) or engines (TensorRT) this export consists of."""
        return (SEMANTIC_PART,) if self.task == "semantic" else PARTS

    def part_path(self, part: str) -> Path:
        """Path of the encoder/decoder/semantic graph (ONNX) or engine (TensorRT) in the folder."""
        if self.kind == "tensorrt":
            return self.folder / f"{part}.engine"
        return self.folder / self.meta["files"][part]["name"]

    def mask_slice(self, multimask: bool) -> slice | None:
        """Which decoder outputs answer `multimask`; None when this export cannot answer it."""
        return MASK_SLICES.get(self.mask_outputs, {}).get(bool(multimask))


def _model_fields(onnx_meta: dict) -> dict:
    spec = onnx_meta["model"]["spec"]
    return {"family": spec["family"], "img_size": int(spec["img_size"]),
            "embedding_size": int(onnx_meta["model"]["embedding_size"]),
            "with_preprocess": bool(onnx_meta["with_preprocess"]),
            "input_dtype": onnx_meta.get("input_dtype", "uint8"), "mask_outputs": onnx_meta["mask_outputs"],
            "max_batch": int(onnx_meta.get("max_batch", 1)),
            "pixel_mean": tuple(float(v) for v in spec.get("pixel_mean", (0.0, 0.0, 0.0)))}


def write_sidecar(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as a sidecar, stamped with this library's FORMAT_VERSION (atomically)."""
    data = {"format_version": FORMAT_VERSION, **data}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar as a dict; refuses a missing, unreadable or newer-format file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: sidecar not found; expected the folder written by `medico-peft export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers UnicodeDecodeError and JSONDecodeError
        raise ExportError(f"{path}: unreadable sidecar, expected the JSON written by `medico-peft export` "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: sidecar should be a JSON object written by `medico-peft export`, "
                          f"got {type(data).__name__}")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ExportError(f"{path}: sidecar key 'format_version' should be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(f"{path}: sidecar format {data.get('format_version')} is newer than this library "
                          f"supports ({FORMAT_VERSION}); upgrade medico-peft")
    return data


def _checked_fields(onnx_meta, path: Path, where: str = "") -> dict:
    """`_model_fields` plus the keys the backends read (`io`, `files`), or one ExportError naming the key."""
    try:
        fields = _model_fields(onnx_meta)
        for part in PARTS:
            if not isinstance(onnx_meta["files"][part]["name"], str):
                raise TypeError(f"files.{part}.name is not a string")
            io = onnx_meta["io"][part]
            for kind in ("inputs", "outputs"):
                if not all(isinstance(e, dict) and {"name", "dtype", "shape"} <= set(e) for e in io[kind]):
                    raise TypeError(f"io.{part}.{kind} entries need name, shape and dtype")
    except KeyError as exc:
        raise ExportError(f"{path}: sidecar key {where}{exc.args[0]!r} is missing; expected the sidecar written by "
                          "`medico-peft export`") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: sidecar {where or 'content'} is malformed ({type(exc).__name__}: {exc}); "
                          "expected the sidecar written by `medico-peft export`") from None
    if fields["max_batch"] < 1:
        raise ExportError(f"{path}: sidecar key {where}'max_batch' is {fields['max_batch']}, expected >= 1")
    if fields["mask_outputs"] not in MASK_SLICES:
        raise ExportError(f"{path}: sidecar key {where}'mask_outputs' is {fields['mask_outputs']!r}, expected one of "
                          f"{sorted(MASK_SLICES)}")
    return fields


def sidecar_task(onnx_meta: dict, path) -> str:
    """The task an export's sidecar records ("interactive" when absent), refused when unknown."""
    task = onnx_meta.get("task", "interactive") if isinstance(onnx_meta, dict) else "interactive"
    if task not in TASKS:
        raise ExportError(f"{path}: sidecar key 'task' is {task!r}, expected one of {list(TASKS)}")
    return task


def _checked_semantic_fields(onnx_meta: dict, path: Path, where: str = "") -> dict:
    """The typed fields of a semantic sidecar (one graph, image → class logits), or one ExportError naming the key."""
    try:
        spec = onnx_meta["model"]["spec"]
        sem = onnx_meta["semantic"]
        fields = {"family": spec["family"], "img_size": int(spec["img_size"]),
                  "embedding_size": int(onnx_meta["model"]["embedding_size"]),
                  "with_preprocess": bool(onnx_meta["with_preprocess"]),
                  "input_dtype": onnx_meta.get("input_dtype", "uint8"), "mask_outputs": "none",
                  "task": "semantic", "semantic": dict(sem)}
        if not isinstance(onnx_meta["files"][SEMANTIC_PART]["name"], str):
            raise TypeError(f"files.{SEMANTIC_PART}.name is not a string")
        io = onnx_meta["io"][SEMANTIC_PART]
        for kind in ("inputs", "outputs"):
            if not all(isinstance(e, dict) and {"name", "dtype", "shape"} <= set(e) for e in io[kind]):
                raise TypeError(f"io.{SEMANTIC_PART}.{kind} entries need name, shape and dtype")
        names, n = sem["class_names"], int(sem["num_classes"])
        if not isinstance(names, list) or len(names) != n or n < 2:
            raise ValueError(f"semantic.class_names has {len(names) if isinstance(names, list) else names!r} "
                             f"entries for num_classes {n} (expected one name per class, at least 2)")
        if sem["logits_at"] not in LOGITS_AT:
            raise ValueError(f"semantic.logits_at is {sem['logits_at']!r}, expected one of {list(LOGITS_AT)}")
    except KeyError as exc:
        raise ExportError(f"{path}: sidecar key {where}{exc.args[0]!r} is missing; expected the sidecar written by "
                          "`medico-peft export onnx` for a semantic model") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: sidecar {where or 'content'} is malformed ({type(exc).__name__}: {exc}); "
                          "expected the sidecar written by `medico-peft export onnx` for a semantic model") from None
    return fields


def _typed_fields(onnx_meta: dict, path: Path, where: str = "") -> dict:
    if sidecar_task(onnx_meta, path) == "semantic":
        return _checked_semantic_fields(onnx_meta, path, where)
    return _checked_fields(onnx_meta, path, where)


def require_task(artifact: ExportedModel, task: str) -> ExportedModel:
    """Refuse an export made for the other task, saying what it is and what to call instead."""
    if artifact.task == task:
        return artifact
    if artifact.task == "semantic":
        names = artifact.semantic.get("class_names", [])
        raise ExportError(f"{artifact.sidecar}: this is a semantic export ({len(names)} classes: "
                          f"{', '.join(map(str, names[:6]))}{', ...' if len(names) > 6 else ''}), not an interactive "
                          "one; use Predictor.predict_semantic(image) (CLI: `medico-peft predict --semantic`)")
    raise ExportError(f"{artifact.sidecar}: this is an interactive export (image encoder + prompt decoder), not a "
                      "semantic one; use Predictor.set_image + predict(box/points) (CLI: `medico-peft predict` "
                      "without --semantic), or export a semantic adapter")


def read_onnx_export(folder: str | os.PathLike) -> ExportedModel:
    """The `export.json` of an ONNX export folder (interactive or semantic, by its `task`), typed."""
    folder = Path(folder)
    meta = read_sidecar(folder / ONNX_SIDECAR)
    return ExportedModel(folder=folder, kind="onnx", meta=meta, **_typed_fields(meta, folder / ONNX_SIDECAR))


def read_engine_export(folder: str | os.PathLike) -> ExportedModel:
    """The `engine.json` of a TensorRT export folder, typed (compatibility is checked separately)."""
    folder = Path(folder)
    path = folder / ENGINE_SIDECAR
    meta = read_sidecar(path)
    for key in ("onnx", "profiles"):
        if not isinstance(meta.get(key), dict):
            raise ExportError(f"{path}: sidecar key {key!r} should be an object, got {type(meta.get(key)).__name__}; "
                              "expected the engine.json written by `medico-peft export tensorrt`")
    return ExportedModel(folder=folder, kind="tensorrt", meta=meta, profiles=meta["profiles"],
                         **_typed_fields(meta["onnx"], path, "onnx."))


def ort_io(session) -> dict:
    """Names, shapes and dtypes of an onnxruntime session's inputs and outputs, in the sidecar's vocabulary."""
    def describe(values):
        return [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
                 "dtype": _ORT_DTYPES.get(v.type, v.type)} for v in values]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def _fmt(entries: list[dict]) -> str:
    return ", ".join(f"{e['name']} {tuple(e['shape'])} {e['dtype']}" for e in entries)


def check_io(expected: dict, found: dict, source: str) -> None:
    """Refuse a graph whose inputs/outputs differ from what the sidecar (i.e. the model) expects.

    Inputs are compared fully (names, shapes, dtypes); outputs by name and dtype, because runtimes
    fill in output dimensions the exporter left symbolic.
    """
    def strip(entries):
        return [{"name": e["name"], "dtype": e["dtype"]} for e in entries]

    for kind, exp, got in (("inputs", expected["inputs"], found["inputs"]),
                           ("outputs", strip(expected["outputs"]), strip(found["outputs"]))):
        if exp != got:
            fmt = _fmt if kind == "inputs" else (lambda es: ", ".join(f"{e['name']} {e['dtype']}" for e in es))
            raise ExportError(f"{source}: {kind} do not match the model in the sidecar (another model's file?): "
                              f"expected {fmt(exp)}; found {fmt(got)}")


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def import_tensorrt():
    """The tensorrt module, or ExportError when it is missing or older than TensorRT 10."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(f"TensorRT is not installed ({exc}); pip install tensorrt (its Python bindings are on "
                          "the package index); building and running engines also needs a CUDA GPU") from None
    if trt_major(trt.__version__) < 10:
        raise ExportError(f"TensorRT {trt.__version__} is too old; expected 10 or newer")
    return trt


def current_device_info() -> dict:
    """TensorRT version, GPU name and compute capability here (what an engine is bound to)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": [major, minor]}


def check_engine_compat(engine_meta: dict, current: dict, source: str) -> None:
    """A TensorRT engine only runs with the TensorRT version and GPU architecture it was built for."""
    problems = []
    if engine_meta.get("tensorrt_version") != current.get("tensorrt_version"):
        problems.append(f"TensorRT {engine_meta.get('tensorrt_version')} (running {current.get('tensorrt_version')})")
    if tuple(engine_meta.get("compute_capability", ())) != tuple(current.get("compute_capability", ())):
        problems.append(f"compute capability {tuple(engine_meta.get('compute_capability', ()))} "
                        f"(running {tuple(current.get('compute_capability', ()))})")
    if engine_meta.get("gpu_name") != current.get("gpu_name") and not problems:
        problems.append(f"GPU {engine_meta.get('gpu_name')!r} (running {current.get('gpu_name')!r})")
    if problems:
        raise ExportError(f"{source}: engine was built for " + " and ".join(problems)
                          + "; rebuild it here with `medico-peft export tensorrt`")


def check_shapes_fit(profile: dict, shapes: dict, source: str) -> None:
    """Refuse inputs outside the engine's optimisation profile, naming the input and its range."""
    for name, (lo, _opt, hi) in profile.items():
        shape = list(shapes[name])
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            extra = ""
            if name in ("point_coords", "point_labels"):
                extra = f" ({shape[1]} points incl. box corners/padding; engine built for 1..{hi[1]}: " \
                        "rebuild with a larger --max-points)"
            raise ExportError(f"{source}: input {name} shape {shape} is outside the engine profile "
                              f"{lo}..{hi}{extra}")
