"""fp32 ONNX → mixed fp16/bf16 ONNX for strongly typed TensorRT (TensorRT 11 has no weak typing:
the graph's own types decide each layer's precision, so the conversion happens here).

Only an allow-list of numerically benign ops (matmuls, convs, elementwise, data movement) runs
in low precision; everything else — LayerNormalization, Softmax, reductions, Pow/Sqrt/Div/Exp,
Resize — stays fp32, with Cast nodes inserted at every boundary. Graph inputs and outputs keep
fp32, so callers and the sidecar do not change.
"""

from __future__ import annotations

import numpy as np

LOW_PRECISION_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Relu", "Sigmoid", "Tanh", "Erf", "Gelu",
    "Transpose", "Reshape", "Concat", "Split", "Slice", "Gather", "Unsqueeze", "Squeeze", "Flatten", "Pad",
    "Expand", "Neg", "Abs", "Identity", "MaxPool", "AveragePool", "Tile", "Where",
})
KEEP_FP32_EXAMPLES = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "Pow", "Sqrt", "Div",
                      "Exp", "Resize", "Sin", "Cos")  # documentation: anything outside LOW_PRECISION_OPS stays fp32
# Prompt geometry stays fp32 even in allow-listed ops: pixel coordinates above 2048 are not exact in
# fp16, and the random-Fourier positional encoding (coords @ gaussian → sin/cos) amplifies any error.
# The exporter names the wrapper's own arithmetic (coordinate scaling, mask-embedding mix, in-graph
# preprocessing) with a single scope level ("/Mul_3"); the positional encoding lives under "/pe_layer/".
DEFAULT_KEEP_FP32_PREFIXES = ("/pe_layer/",)
FP16_MAX = 65504.0
# ONNX only allows bfloat16 for these from opset 22 on; below that they stay fp32 in bf16 graphs.
BF16_FROM_OPSET_22 = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool"})


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _low_initializer(tensor, name: str, target: str):
    from onnx import TensorProto, helper, numpy_helper

    arr = numpy_helper.to_array(tensor).astype(np.float32)
    if target == "fp16":
        return numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name)
    t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape, _to_bf16_bits(arr).tobytes(), raw=True)
    return t


def _tensor_types(model) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def convert_to_mixed_precision(model, target: str = "fp16", keep_fp32_prefixes=DEFAULT_KEEP_FP32_PREFIXES,
                               keep_top_level: bool = True):
    """Return a new ModelProto with allow-listed ops in `target` ("fp16" or "bf16") and fp32 IO.

    Nodes whose name starts with one of `keep_fp32_prefixes`, or (with `keep_top_level`) that sit at
    the top scope of the exported wrapper, stay fp32.
    """
    import onnx
    from onnx import TensorProto, helper

    if target not in ("fp16", "bf16"):
        raise ValueError(f"target: expected fp16 or bf16, got {target!r}")
    low_type = TensorProto.FLOAT16 if target == "fp16" else TensorProto.BFLOAT16
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    types = _tensor_types(model)
    inits = {t.name: t for t in g.initializer}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    allowed = LOW_PRECISION_OPS - (BF16_FROM_OPSET_22 if target == "bf16" and opset < 22 else frozenset())
    low: set[str] = set()          # tensors that now hold low-precision values (original names)
    low_copy: dict[str, str] = {}  # fp32 tensor -> its low-precision copy
    f32_copy: dict[str, str] = {}  # low tensor -> its fp32 copy
    new_inits, nodes = [], []

    def to_low(name: str) -> str:
        if name not in low_copy:
            low_copy[name] = f"{name}__{target}"
            if name in inits:
                new_inits.append(_low_initializer(inits[name], low_copy[name], target))
            else:
                nodes.append(helper.make_node("Cast", [name], [low_copy[name]], to=low_type))
        return low_copy[name]

    def to_f32(name: str) -> str:
        if name not in f32_copy:
            f32_copy[name] = f"{name}__fp32"
            nodes.append(helper.make_node("Cast", [name], [f32_copy[name]], to=TensorProto.FLOAT))
        return f32_copy[name]

    for node in list(g.node):
        float_in = [i for i in node.input if i and types.get(i) == TensorProto.FLOAT]
        typed = all(types.get(o) is not None for o in node.output if o)
        forced = any(node.name.startswith(p) for p in keep_fp32_prefixes) or \
            (keep_top_level and node.name.count("/") <= 1)
        if node.op_type in allowed and typed and not forced and (float_in or any(i in low for i in node.input)):
            for k, name in enumerate(node.input):
                if name and name not in low and types.get(name) == TensorProto.FLOAT:
                    node.input[k] = to_low(name)
            low.update(o for o in node.output if types.get(o) == TensorProto.FLOAT)
        else:
            for k, name in enumerate(node.input):
                if name in low:
                    node.input[k] = to_f32(name)
        nodes.append(node)

    # graph outputs keep fp32 under their original names
    renames = {o.name: f"{o.name}__{target}_out" for o in g.output if o.name in low}
    for node in nodes:
        for k, name in enumerate(node.input):
            node.input[k] = renames.get(name, name)
        for k, name in enumerate(node.output):
            node.output[k] = renames.get(name, name)
    for original, renamed in renames.items():
        nodes.append(helper.make_node("Cast", [renamed], [original], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]  # stale types; re-inferred below
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def precision_summary(model) -> dict:
    """{op_type: {"fp32": n, "low": n}} by the type of each node's first float input (for tests and reports)."""
    from onnx import TensorProto

    types = _tensor_types(model)
    out: dict = {}
    for node in model.graph.node:
        t = next((types.get(i) for i in node.input if types.get(i) in (1, 10, 16)), None)
        if t is None:
            continue
        key = "fp32" if t == TensorProto.FLOAT else "low"
        out.setdefault(node.op_type, {"fp32": 0, "low": 0})[key] += 1
    return out
