"""JSON sidecars next to exported artefacts, and the checks that refuse mismatched files.

`export.json` (ONNX) records where the graphs came from (model spec, base sha256, adapter sha256),
their exact inputs/outputs and the parity table; `engine.json` (TensorRT) adds the TensorRT
version and the GPU it was built for, because a serialized engine only runs there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medico_peft.errors import ExportError
from medico_peft.utils.atomic import atomic_write_text

ONNX_SIDECAR = "export.json"
ENGINE_SIDECAR = "engine.json"
FORMAT_VERSION = 1

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(float16)": "float16", "tensor(bool)": "bool"}


def onnx_io(path: str | os.PathLike) -> dict:
    """Names, shapes (ints or symbolic names) and dtypes of a graph's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def ort_io(session) -> dict:
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


def write_sidecar(path: str | os.PathLike, data: dict) -> Path:
    data = {"format_version": FORMAT_VERSION, **data}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def read_sidecar(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: sidecar not found; expected the folder written by `medico-peft export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable sidecar ({exc})") from None
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path}: sidecar format {data.get('format_version')} is newer than this library "
                          f"supports ({FORMAT_VERSION}); upgrade medico-peft")
    return data


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
