"""Writer side of the export sidecars: describing an ONNX graph's inputs and outputs for `export.json`.

The sidecar contract itself (names, format version, reading, writing, the checks that refuse
mismatched files) belongs to the reader, `medico_peft.runtime.artifacts`; the exporter writes
through it. `onnx_io` lives here because only the exporter needs the `onnx` package to inspect a graph.
"""

from __future__ import annotations

import os

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}


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
