"""int8 ONNX exports for onnxruntime on CPU, behind an accuracy gate against the fp32 export.

`quantize_export(fp32_folder, out, ...)` turns an fp32 export folder (written by `export_onnx`, parity-gated
against torch) into an int8 one; `export_onnx_int8(model, out, ...)` does both in one call (the fp32 graphs
go to a scratch folder that is removed afterwards). Phases:

1. Real slices (`load_slices`): from the user's shard manifest (`calibration`), or, when none is given and no
   static calibration is asked for, from the Colin27 + AAL atlas converted at the model's size in a
   scratch folder. Calibration slices come from the train split, gate slices from the other splits, so the
   gate runs on slices the calibration never saw (when there are too few, it reuses them and says so).
2. Candidates per graph (`quantize_graph`): `dynamic` (MatMul/Gemm weights int8 per output channel,
   activations quantized at run time) and `static` (QDQ: weights int8 per channel, activations uint8 with
   ranges calibrated on the calibration slices; the encoder is fed their preprocessed images, the decoder
   the fp32 encoder's embeddings of them with one box per object). Only MatMul and Gemm are quantized:
   LayerNormalization, Softmax, GELU and the convolutions stay fp32 (a development measurement on this
   2-core Xeon, not in a results file: static int8 with the pointwise convolutions added took the LiteMedSAM
   encoder from 1.44 to 2.15 s and its mean abs embedding error from 0.0096 to 0.043).
3. Choice (`mode="auto"`): every candidate, and the fp32 graph itself, is timed on this CPU with the same
   threads; the fastest is kept per graph (so a graph that int8 does not speed up stays fp32). `dynamic` or
   `static` force that mode on both graphs. If the gate fails in auto mode, the layers that cost the most
   accuracy per unit of work are kept fp32, a quarter, half, then three quarters of them (`AUTO_FP32_FRACTIONS`),
   and the gate runs again; the refusal lists every try. The ranking (`output_sensitivity`) is end-to-end: each
   layer alone int8 in the fp32 graph, the relative error of the graph's outputs on real inputs, squared and
   divided by the layer's multiply-accumulates. Why (LiteMedSAM on Colin27, bench_quantize and development
   measurements): no single layer carries the int8 error. Every one of the encoder's 40 MatMuls adds 0.1-2.8 %
   to the embedding error, weight rounding and activation rounding about equally (weights alone int8, even in
   blocks of 32: Dice 0.96-0.97), and the layers' errors add in quadrature to the fully int8 encoder's
   (0.08 relative); mean mask Dice to fp32 drops by about 0.75x that error, so Dice 0.98 needs the embedding error
   below about 0.025, i.e. most of the error-dense layers (MLP fc2, the last stage's fc1) in fp32. per_channel off,
   reduce_range and asymmetric weights did not help (0.87, 0.92, 0.93) on that (VNNI) Xeon. On x86 CPUs without
   VNNI the weights are 7-bit (`weights_reduce_range`): 8-bit weights saturate the int8 kernels there.
4. Accuracy gate (`accuracy_gate`): the staged int8 folder and the fp32 folder, both through `OrtBackend`,
   predict one box per object on the gate slices; per slice the mean mask Dice (int8 mask vs fp32 mask at the
   image's size) and the abs error of the full-resolution logits. Failing any threshold (`QuantGate`) raises
   ExportError naming the figure and the threshold, and nothing is written.
5. The sidecar keeps the fp32 export's fields (its parity gate against torch under `parity`) and adds
   `quantization`: per-graph mode and timings, the calibration source (manifest path and sha256, slices), the
   gate's thresholds, figures and slices.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ExportError
from ..runtime.artifacts import ONNX_SIDECAR, PARTS, read_onnx_export, write_sidecar

QUANT_MODES = ("auto", "dynamic", "static")
QUANT_OP_TYPES = ("MatMul", "Gemm")
DEFAULT_CALIBRATION_SLICES = 8
DEFAULT_GATE_SLICES = 8
MAX_OBJECTS_PER_SLICE = 8
# auto mode: shares of each int8 graph's layers kept fp32 (ranked by `output_sensitivity`: output error² per
# multiply-accumulate, largest first), tried in order until the gate passes. 0.75 is the step LiteMedSAM needs on
# Colin27 (development run of quantize_export, auto, built-in slices, both graphs dynamic: mean mask Dice to fp32
# 0.9232 / 0.9687 / 0.9712 / 0.9835 with 0 / 25 / 50 / 75 % of the layers kept fp32; bench_quantize records it).
AUTO_FP32_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


@dataclass
class QuantGate:
    """Thresholds of the int8-vs-fp32 gate (the CLI's --gate-* options)."""

    min_dice: float = 0.98         # mean over gate slices of the per-slice mean mask Dice, int8 vs fp32
    # The two logit limits are loose on purpose: they catch a broken graph; the Dice limit is the accuracy gate.
    # (LiteMedSAM on Colin27, bench_quantize: dynamic int8 0.55 mean / 5.5 max, static 1.2 / 9.1.)
    max_logit_mean: float = 2.0    # mean abs error of the full-resolution logits (mean over slices)
    max_logit_max: float = 20.0    # largest abs logit error anywhere

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "QuantGate":
        if not 0.0 <= self.min_dice <= 1.0:
            raise ExportError(f"--gate-dice: expected a Dice in [0, 1], got {self.min_dice}")
        for name, value in (("--gate-logit-mean", self.max_logit_mean), ("--gate-logit-max", self.max_logit_max)):
            if not value >= 0:
                raise ExportError(f"{name}: expected a logit error >= 0, got {value}")
        return self


@dataclass
class RealSlice:
    """One shard slice as the gate and the calibration use it: the image content at the size it was
    converted to, and the objects in it."""

    image: np.ndarray                 # H×W×3 uint8
    masks: list = field(repr=False)   # bool H×W, one per object (at most MAX_OBJECTS_PER_SLICE)
    label_ids: list
    where: str                        # "<shard file>#<row>"
    split: str


def _pick(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(i * (n_total - 1) / max(n - 1, 1))) for i in range(n)}) if n > 1 else [n_total // 2]


def _slice_keys(manifest: Path) -> list[tuple[str, int]]:
    """(split, position within the split) of every slice with an object, in manifest order."""
    from ..data.dataset import iter_eval_slices
    from ..data.manifest import SPLITS, load_manifest

    m = load_manifest(manifest)
    keys = []
    for split in SPLITS:
        if m.shards_for(split):
            keys += [(split, i) for i, _ in enumerate(iter_eval_slices(manifest, split=split, verify=False))]
    return keys


def _as_real_slice(item: dict, split: str) -> RealSlice:
    h, w = item["input_size"]
    image = np.round(item["image"][:, :h, :w].permute(1, 2, 0).numpy() * 255.0).clip(0, 255).astype(np.uint8)
    labels = item["label_map"][:h, :w].numpy()
    ids = [i for i in item["label_ids"] if (labels == i).any()]
    ids = [ids[k] for k in _pick(len(ids), MAX_OBJECTS_PER_SLICE)]
    return RealSlice(np.ascontiguousarray(image), [labels == i for i in ids], ids,
                     f"{Path(item['shard']).name}#{item['sample']}", split)


def load_slices(manifest, img_size: int, n_calibration: int, n_gate: int) -> tuple[list, list, bool]:
    """(calibration slices, gate slices, held_out) from a shard manifest whose image size must be `img_size`.

    Calibration slices are spread over the train split (all splits when it has none), gate slices over the
    other splits first; `held_out` is False when the manifest had too few slices to keep the two apart and
    the gate reuses calibration slices."""
    from ..data.dataset import iter_eval_slices
    from ..data.manifest import load_manifest

    path = Path(manifest)
    if path.is_dir():
        path = path / "manifest.json"
    m = load_manifest(path, verify=True)
    if int(m.image_size) != int(img_size):
        raise DataError(f"{path}: image_size {m.image_size} does not match the model's input size {img_size}; "
                        f"convert the calibration shards with --size {img_size}")
    keys = _slice_keys(path)
    if not keys:
        raise DataError(f"{path}: no slice with a labelled object; calibration and the int8 gate need objects")
    train = [k for k in keys if k[0] == "train"] or keys
    cal = [train[i] for i in _pick(len(train), n_calibration)]
    rest = [k for k in keys if k not in cal]
    others = [k for k in rest if k[0] != "train"] or rest
    gate = [others[i] for i in _pick(len(others), n_gate)] if others else []
    held_out = bool(gate)
    if not gate:
        gate = cal[:n_gate]
    wanted = set(cal) | set(gate)
    loaded = {}
    for split in dict.fromkeys(k[0] for k in wanted):
        for i, item in enumerate(iter_eval_slices(path, split=split, verify=False)):
            if (split, i) in wanted:
                loaded[(split, i)] = _as_real_slice(item, split)
    return [loaded[k] for k in cal], [loaded[k] for k in gate], held_out


def builtin_manifest(img_size: int, scratch: Path) -> Path:
    """Colin27 T1 + AAL converted at `img_size` into `scratch` (the gate's slices when none are given)."""
    from ..data.real_data import build_colin27_aal_shards

    try:
        report = build_colin27_aal_shards(scratch / "colin27", size=img_size)
    except DataError as exc:
        raise ExportError(f"int8 export: no --calibration manifest given and the built-in Colin27 + AAL slices are "
                          f"not available ({exc}); pass --calibration with shards converted at --size {img_size}") from None
    return Path(report.manifest_path)


# --- graphs -------------------------------------------------------------------------------------------------

def _external(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


def _preprocessed(src: Path, work: Path) -> Path:
    """onnxruntime's recommended pre-quantization pass (graph optimisation + shape inference)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = work / f"{src.stem}.pre.onnx"
    ext = _external(src)
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, save_as_external_data=ext,
                          all_tensors_to_one_file=True, external_data_location=dst.name + ".data" if ext else None)
    except Exception as exc:  # onnxruntime's tools raise assorted types
        raise ExportError(f"{src}: onnxruntime's pre-quantization pass failed ({type(exc).__name__}: {exc})") from None
    return dst


class _Feeds:
    """onnxruntime's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

        self.reader = Reader()


def weights_reduce_range(cpuinfo: str | None = None) -> bool:
    """Whether int8 weights use 7 bits (onnxruntime's `reduce_range`) on this machine: yes on x86 CPUs without
    VNNI (/proc/cpuinfo lists neither avx512_vnni nor avx_vnni), whose u8 x s8 kernels add pairs of products in
    int16 and saturate with full-range weights (onnxruntime's quantization documentation: 7-bit for non-VNNI
    CPUs). Measured: LiteMedSAM dynamic int8 on an AVX2-only AMD EPYC had mean mask Dice to fp32 0.80 with 8-bit
    weights, and a single int8 layer's real error was 20x its 8-bit emulation."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = cpuinfo.split()
    x86 = "avx2" in flags or "sse4_2" in flags
    return x86 and "avx512_vnni" not in flags and "avx_vnni" not in flags


def weight_qmax() -> int:
    """Largest int8 weight magnitude the quantizer writes here: 64 with reduce_range, else 127."""
    return 64 if weights_reduce_range() else 127


def _int8_weights(w: np.ndarray, qmax: int) -> np.ndarray:
    """(in, out) weights rounded as the quantizer does it: symmetric int8 per output channel, |q| <= qmax."""
    sw = np.abs(w).max(axis=0) / qmax
    sw[sw == 0] = 1.0
    return np.clip(np.round(w / sw), -qmax, qmax) * sw


def quantize_graph(src: Path, dst: Path, mode: str, calibration_feeds: list[dict] | None = None,
                   op_types=QUANT_OP_TYPES, per_channel: bool = True, keep_fp32=(),
                   reduce_range: bool | None = None) -> Path:
    """Write the int8 version of the fp32 graph `src` to `dst` (`mode` dynamic or static; static calibrates
    activation ranges on `calibration_feeds`). `keep_fp32`: names of nodes (in the pre-processed graph, see
    `sensitivity`) left in fp32. Weights inline unless `src` keeps them in external data. `reduce_range`:
    7-bit weights; default `weights_reduce_range()` (this machine's CPU)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    reduce_range = weights_reduce_range() if reduce_range is None else reduce_range
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.stem}.quant.", dir=dst.parent))
    try:
        pre = _preprocessed(src, work)
        ext = _external(src)
        # onnxruntime rewrites a Gemm as MatMul + Add named "<gemm>_MatMul" before quantizing it: exclude both names
        exclude = [n for name in keep_fp32 for n in (name, f"{name}_MatMul")] or None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "dynamic":
                quantize_dynamic(str(pre), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                                 reduce_range=reduce_range, weight_type=QuantType.QInt8,
                                 use_external_data_format=ext, nodes_to_exclude=exclude)
            elif mode == "static":
                if not calibration_feeds:
                    raise ExportError(f"{src}: static quantization needs calibration inputs; none were given")
                quantize_static(str(pre), str(dst), _Feeds(calibration_feeds).reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(op_types), per_channel=per_channel,
                                reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=ext,
                                nodes_to_exclude=exclude)
            else:
                raise ExportError(f"quantization mode: expected dynamic or static, got {mode!r}")
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{src}: onnxruntime {mode} quantization failed ({type(exc).__name__}: {exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


def sensitivity(src: Path, feeds: list[dict], op_types=QUANT_OP_TYPES, max_feeds: int = 2,
                work_dir: Path | None = None) -> dict[str, float]:
    """Local int8 error of every weight-carrying MatMul/Gemm of the fp32 graph `src`, largest first: each layer's
    output computed from its real fp32 input (captured on `feeds`) with int8 emulated as onnxruntime does it
    (activations uint8 per tensor, weights int8 per output channel, 7-bit where `weights_reduce_range()`),
    relative L2 error to the fp32 output.
    Keys are node names of the pre-processed graph (what `quantize_graph(keep_fp32=...)` takes)."""
    import onnx
    from onnx import helper, numpy_helper

    from ..runtime.ort_backend import make_session

    qmax = weight_qmax()  # the weight grid quantize_graph writes on this machine
    work = Path(tempfile.mkdtemp(prefix=f".{src.stem}.sens.", dir=work_dir))
    try:
        pre = _preprocessed(src, work)
        model = onnx.load(str(pre))
        inits = {i.name: i for i in model.graph.initializer}
        layers = []
        for node in model.graph.node:
            if node.op_type in op_types and len(node.input) > 1 and node.input[1] in inits:
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Gemm" and attrs.get("transB", 0):
                    w = w.T
                if w.ndim != 2 or attrs.get("transA", 0):
                    continue
                layers.append((node.name, node.input[0], w))
        outputs = {o.name for o in model.graph.output}
        for _, x_name, _ in layers:
            if x_name not in outputs:
                model.graph.output.append(helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, None))
                outputs.add(x_name)
        probe = work / "probe.onnx"
        onnx.save(model, str(probe), save_as_external_data=_external(src), all_tensors_to_one_file=True,
                  location="probe.onnx.data")
        sess = make_session(probe, optimize=False)
        names = list(dict.fromkeys(x for _, x, _ in layers))
        errors = {name: [] for name, _, _ in layers}
        for feed in feeds[:max_feeds]:
            acts = dict(zip(names, sess.run(names, feed)))
            for name, x_name, w in layers:
                x = acts[x_name].reshape(-1, w.shape[0]).astype(np.float32)
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                sx = (hi - lo) / 255.0 or 1.0
                zx = np.round(-lo / sx)
                xq = (np.clip(np.round(x / sx) + zx, 0, 255) - zx) * sx
                wq = _int8_weights(w, qmax)
                ref = x @ w
                errors[name].append(float(np.linalg.norm(xq @ wq - ref) / max(np.linalg.norm(ref), 1e-12)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ranked = {name: float(np.mean(e)) for name, e in errors.items() if e}
    return dict(sorted(ranked.items(), key=lambda kv: -kv[1]))


def _weighted_layers(model, nodes, op_types) -> list[tuple[int, object, np.ndarray, bool]]:
    """(index in `nodes`, node, weight as K×N, weight stored transposed) of every MatMul/Gemm of `model` with a 2-D
    weight initializer."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    layers = []
    for i, node in enumerate(nodes):
        if node.op_type in op_types and len(node.input) > 1 and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            if w.ndim != 2 or attrs.get("transA", 0):
                continue
            trans = bool(node.op_type == "Gemm" and attrs.get("transB", 0))
            layers.append((i, node, w.T if trans else w, trans))
    return layers


def output_sensitivity(src: Path, feeds: list[dict], op_types=QUANT_OP_TYPES, max_feeds: int = 2,
                       work_dir: Path | None = None, threads: int | None = None) -> dict[str, dict]:
    """End-to-end int8 cost of every weight-carrying MatMul/Gemm of the fp32 graph `src`, one layer at a time:
    the layer alone is int8 in the pre-processed fp32 graph (weights rounded to int8 per output channel, its input
    through DynamicQuantizeLinear + DequantizeLinear, i.e. uint8 per tensor as dynamic quantization does it), and
    `output_error` is the relative L2 error of the graph's outputs on real `feeds` (mean over outputs and feeds).
    `macs`: the layer's multiply-accumulates on the first feed (the work int8 would speed up).

    Ranked by output_error² / macs, largest first: the layers that cost the most accuracy per unit of work saved
    come first and are the first kept fp32 (`quantize_export`). Why end-to-end: on LiteMedSAM the per-layer output
    errors add up in quadrature to the error of the fully int8 encoder (sum of squares of the 40 layers' embedding
    errors: 0.081, measured 0.078), while the layer-local error (`sensitivity`) misses how much a layer's error
    grows on the way to the output. Keys are node names of the pre-processed graph."""
    import onnx
    from onnx import helper, numpy_helper

    from ..runtime.ort_backend import make_session

    qmax = weight_qmax()  # the weight grid quantize_graph writes on this machine
    work = Path(tempfile.mkdtemp(prefix=f".{src.stem}.osens.", dir=work_dir))
    ext = _external(src)
    try:
        pre = _preprocessed(src, work)
        model = onnx.load(str(pre))
        nodes = [copy.deepcopy(n) for n in model.graph.node]
        layers = _weighted_layers(model, nodes, op_types)
        feeds = feeds[:max_feeds]
        if not layers or not feeds:
            return {}

        def save(m, name):
            path = work / name
            onnx.save(m, str(path), save_as_external_data=ext, all_tensors_to_one_file=True,
                      location=name + ".data")
            return path

        # the layers' input shapes (for their work), from one run with those inputs as extra outputs
        probe = copy.deepcopy(model)
        have = {o.name for o in probe.graph.output}
        x_names = list(dict.fromkeys(node.input[0] for _, node, _, _ in layers))
        probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                                  for x in x_names if x not in have)
        shapes = {x: a.shape for x, a in zip(x_names, make_session(save(probe, "probe.onnx"), threads).run(x_names, feeds[0]))}
        del probe
        reference = make_session(pre, threads)
        ref_out = [reference.run(None, f) for f in feeds]
        inits = {i.name: i for i in model.graph.initializer}
        result = {}
        for k, (idx, node, w, trans) in enumerate(layers):
            init = inits[node.input[1]]
            saved = copy.deepcopy(init)
            wq = _int8_weights(w, qmax).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(wq.T if trans else wq, init.name))
            x = node.input[0]
            t = f"_osens{k}"
            fake = [helper.make_node("DynamicQuantizeLinear", [x], [t + "_q", t + "_s", t + "_z"], name=t + "_quant"),
                    helper.make_node("DequantizeLinear", [t + "_q", t + "_s", t + "_z"], [t + "_x"], name=t + "_dequant")]
            fed = copy.deepcopy(node)
            fed.input[0] = t + "_x"
            del model.graph.node[:]
            model.graph.node.extend(nodes[:idx] + fake + [fed] + nodes[idx + 1:])
            try:
                sess = make_session(save(model, "layer.onnx"), threads)
                errs = []
                for feed, ref in zip(feeds, ref_out):
                    for r, o in zip(ref, sess.run(None, feed)):
                        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
                        errs.append(float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12)))
            finally:
                init.CopyFrom(saved)
                del model.graph.node[:]
                model.graph.node.extend(nodes)
            rows = int(np.prod(shapes[x][:-1])) if len(shapes[x]) > 1 else 1
            result[node.name] = {"output_error": float(np.mean(errs)), "macs": rows * int(w.shape[0]) * int(w.shape[1])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(sorted(result.items(), key=lambda kv: -kv[1]["output_error"] ** 2 / max(kv[1]["macs"], 1)))


def time_graph(path: Path, feed: dict, threads: int | None, repeats: int = 3) -> float:
    """Median seconds of one run of the graph at `path` on `feed` (after one warm-up run)."""
    from ..runtime.ort_backend import make_session

    sess = make_session(path, threads)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibration_feeds(fp32_backend, slices: list) -> dict[str, list[dict]]:
    """Graph inputs from real slices: the encoder's `image` feed per slice, the decoder's feed per object
    (the fp32 encoder's embeddings and a tight box around the object)."""
    from ..runtime.ort_backend import decoder_feed
    from ..runtime.preprocess import build_prompt_arrays

    enc, dec = [], []
    for s in slices:
        feed = fp32_backend.encoder_feed(s.image)
        enc.append({"image": feed})
        emb = fp32_backend.encode(s.image)
        h, w = s.image.shape[:2]
        for mask in s.masks:
            coords, labels = build_prompt_arrays((h, w), box=_box(mask))
            dec.append(decoder_feed(emb, coords, labels, None, 0.0, (h, w), fp32_backend.embedding_size))
    return {"encoder": enc, "decoder": dec}


# --- gate ----------------------------------------------------------------------------------------------------

def _box(mask: np.ndarray) -> np.ndarray:
    """The tight inclusive xyxy box around an object (the box a reader draws exactly around it)."""
    from ..data.prompts import mask_box

    return mask_box(mask).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def reference_outputs(reference, slices: list) -> list[list[np.ndarray]]:
    """Full-resolution logits (float32, H×W) of `reference` for one tight box per object of each slice."""
    import torch

    from ..runtime.predictor import decode_at_original_size
    from ..runtime.preprocess import build_prompt_arrays

    out = []
    with torch.no_grad():
        for s in slices:
            h, w = s.image.shape[:2]
            emb = reference.encode(s.image)
            out.append([decode_at_original_size(reference, emb, *build_prompt_arrays((h, w), box=_box(mask)), None,
                                                0.0, (h, w), False)[0][0, 0].float().numpy() for mask in s.masks])
    return out


def compare_backends(reference, candidate, slices: list, reference_logits=None) -> dict:
    """Box-prompt predictions of `candidate` vs `reference` (two backends; or `reference_logits` from
    `reference_outputs`) on `slices`: per slice the mean mask Dice over objects and the mean/max abs
    full-resolution logit error; also each side's mean Dice to the labels."""
    if reference_logits is None:
        reference_logits = reference_outputs(reference, slices)
    cand_logits = reference_outputs(candidate, slices)
    rows = []
    for s, refs, cands in zip(slices, reference_logits, cand_logits):
        dice, dice_ref, dice_cand, err_mean, err_max, bad = [], [], [], [], [], 0
        for mask, ref, cand in zip(s.masks, refs, cands):
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            bad += int(np.count_nonzero(~np.isfinite(ref)) + np.count_nonzero(~np.isfinite(cand)))
            diff = np.abs(ref - cand)
            err_mean.append(float(diff.mean()))
            err_max.append(float(diff.max()))
            dice.append(_dice(ref > 0, cand > 0))
            dice_ref.append(_dice(ref > 0, mask))
            dice_cand.append(_dice(cand > 0, mask))
        rows.append({"slice": s.where, "split": s.split, "objects": len(s.masks),
                     "dice_to_fp32": float(np.mean(dice)), "logit_mean_abs": float(np.mean(err_mean)),
                     "logit_max_abs": float(np.max(err_max)), "nonfinite": bad,
                     "dice_to_labels_fp32": float(np.mean(dice_ref)),
                     "dice_to_labels_int8": float(np.mean(dice_cand))})
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    return {"slices": len(rows), "objects": int(sum(r["objects"] for r in rows)),
            "mean_dice_to_fp32": float(np.mean([r["dice_to_fp32"] for r in rows])),
            "min_slice_dice_to_fp32": float(np.min([r["dice_to_fp32"] for r in rows])),
            "logit_mean_abs": float(np.mean([r["logit_mean_abs"] for r in rows])),
            "logit_max_abs": float(np.max([r["logit_max_abs"] for r in rows])),
            "nonfinite": int(sum(r["nonfinite"] for r in rows)),
            "mean_dice_to_labels_fp32": float(np.mean([r["dice_to_labels_fp32"] for r in rows])),
            "mean_dice_to_labels_int8": float(np.mean([r["dice_to_labels_int8"] for r in rows])),
            "rows": rows}


def accuracy_gate(figures: dict, gate: QuantGate, what: str) -> None:
    """Raise ExportError naming the first figure beyond its threshold."""
    n = f"{figures['slices']} slices, {figures['objects']} box prompts"
    if figures["nonfinite"]:
        raise ExportError(f"{what}: int8 accuracy gate failed: {figures['nonfinite']} NaN/Inf logits ({n}); "
                          "nothing was written")
    checks = (("mean mask Dice to fp32", figures["mean_dice_to_fp32"], ">=", gate.min_dice, "--gate-dice"),
              ("mean abs logit error", figures["logit_mean_abs"], "<=", gate.max_logit_mean, "--gate-logit-mean"),
              ("max abs logit error", figures["logit_max_abs"], "<=", gate.max_logit_max, "--gate-logit-max"))
    for label, value, op, limit, option in checks:
        ok = value >= limit if op == ">=" else value <= limit
        if not ok:
            raise ExportError(f"{what}: int8 accuracy gate failed: {label} {value:.4f}, threshold {op} {limit:g} "
                              f"({option}; {n}); nothing was written")


# --- the export ----------------------------------------------------------------------------------------------

def _copy_graph(src: Path, dst_dir: Path) -> None:
    shutil.copy2(src, dst_dir / src.name)
    if _external(src):
        shutil.copy2(src.parent / (src.name + ".data"), dst_dir / (src.name + ".data"))


def _choose(part: str, fp32_path: Path, candidates: dict[str, Path], feed: dict, threads: int | None,
            repeats: int) -> tuple[str, dict]:
    timings = {"fp32": time_graph(fp32_path, feed, threads, repeats)}
    for mode, path in candidates.items():
        timings[mode] = time_graph(path, feed, threads, repeats)
    timings = {k: round(v, 6) for k, v in timings.items()}  # chosen on the figures the sidecar records
    return min(timings, key=timings.get), timings


def _failures(figures: dict, gate: QuantGate) -> list[str]:
    try:
        accuracy_gate(figures, gate, "")
    except ExportError as exc:
        return [str(exc)]
    return []


def _write_folder(folder: Path, artifact, graph_files: dict, meta: dict) -> dict:
    """Copy the chosen graph files into `folder` and describe them in `meta` (files, io); writes the sidecar."""
    from .onnx_export import _file_info
    from .sidecar import onnx_io

    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        _copy_graph(graph_files[part], folder)
    meta["files"] = {part: _file_info(folder / artifact.part_path(part).name) for part in PARTS}
    meta["io"] = {part: onnx_io(folder / artifact.part_path(part).name) for part in PARTS}
    write_sidecar(folder / ONNX_SIDECAR, meta)
    return meta


def quantize_export(fp32_folder, out_dir, *, mode: str = "auto", calibration=None,
                    calibration_slices: int = DEFAULT_CALIBRATION_SLICES, gate_slices: int = DEFAULT_GATE_SLICES,
                    gate: QuantGate | None = None, threads: int | None = None, timing_repeats: int = 3,
                    fp32_fractions=None) -> dict:
    """Quantize the fp32 ONNX export in `fp32_folder` to int8 in `out_dir` behind the accuracy gate; returns the
    sidecar. `calibration`: a shard manifest (or its folder) at the model's image size; None uses the built-in
    Colin27 + AAL slices (not for `static`, which must be calibrated on the user's data).

    `fp32_fractions` (default: `AUTO_FP32_FRACTIONS` in auto mode, (0,) otherwise): shares of each int8 graph's
    layers kept fp32, most sensitive first (`sensitivity`), tried in order until the gate passes."""
    from ..runtime.ort_backend import OrtBackend
    from ..utils.hashing import sha256_file
    from .onnx_export import staging_folder

    if mode not in QUANT_MODES:
        raise ExportError(f"--quant-mode: expected one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "static" and calibration is None:
        raise ExportError("--quant-mode static: needs --calibration MANIFEST (shards of your data at the model's "
                          "size) to calibrate activation ranges; or use --quant-mode dynamic")
    for name, n in (("--calibration-slices", calibration_slices), ("--gate-slices", gate_slices)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ExportError(f"{name}: expected an integer >= 1, got {n!r}")
    gate = (gate or QuantGate()).check()
    fractions = tuple(fp32_fractions if fp32_fractions is not None else
                      (AUTO_FP32_FRACTIONS if mode == "auto" else (0.0,)))
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0]
    if not fractions or bad:
        raise ExportError(f"fp32_fractions: expected shares of int8 layers kept fp32, each in [0, 1), got "
                          f"{list(fractions)!r}")
    fp32_folder, out = Path(fp32_folder), Path(out_dir)
    artifact = read_onnx_export(fp32_folder)
    if artifact.task != "interactive":
        raise ExportError(f"{fp32_folder}: int8 quantization covers interactive exports (encoder + decoder), "
                          f"not {artifact.task} ones")
    if "quantization" in artifact.meta:
        raise ExportError(f"{fp32_folder}: already quantized; quantize the fp32 export")
    fp32 = OrtBackend(fp32_folder, threads=threads)
    t0 = time.perf_counter()
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-work.", dir=out.resolve().parent) as scratch:
        scratch = Path(scratch)
        if calibration is None:
            manifest, source = builtin_manifest(artifact.img_size, scratch), "built-in Colin27 T1 + AAL atlas"
        else:
            manifest = Path(calibration)
            manifest = manifest / "manifest.json" if manifest.is_dir() else manifest
            source = str(manifest)
        cal, gate_set, held_out = load_slices(manifest, artifact.img_size, calibration_slices, gate_slices)
        feeds = calibration_feeds(fp32, cal)
        modes = ["dynamic", "static"] if mode == "auto" else [mode]
        if mode == "auto" and calibration is None:
            modes = ["dynamic"]  # static is calibrated on the user's data only
        full = {part: {m: quantize_graph(artifact.part_path(part), scratch / m / f"{part}.onnx", m, feeds[part])
                       for m in modes} for part in PARTS}
        chosen, timings = {}, {}
        for part in PARTS:
            if mode == "auto":
                chosen[part], timings[part] = _choose(part, artifact.part_path(part), full[part], feeds[part][0],
                                                      threads, timing_repeats)
            else:
                chosen[part], timings[part] = mode, None
        reference = reference_outputs(fp32, gate_set)
        calib = {"source": source, "manifest_sha256": sha256_file(manifest) if calibration is not None else None,
                 "slices": [s.where for s in cal], "objects": int(sum(len(s.masks) for s in cal))}
        ranks, attempts, passed = {}, [], None
        for i, fraction in enumerate(fractions):
            graphs, files = {}, {}
            for part in PARTS:
                m = chosen[part]
                if m == "fp32":
                    files[part] = artifact.part_path(part)
                    graphs[part] = {"mode": "fp32", "seconds_per_run": timings[part], "op_types": [], "keep_fp32": []}
                    continue
                keep = []
                if fraction > 0:
                    if part not in ranks:
                        ranks[part] = output_sensitivity(artifact.part_path(part), feeds[part], work_dir=scratch,
                                                         threads=threads)
                    keep = list(ranks[part])[:int(round(fraction * len(ranks[part])))]
                files[part] = full[part][m] if not keep else quantize_graph(
                    artifact.part_path(part), scratch / f"{m}_keep{i}" / f"{part}.onnx", m, feeds[part], keep_fp32=keep)
                graphs[part] = {"mode": m, "seconds_per_run": timings[part], "op_types": list(QUANT_OP_TYPES),
                                "per_channel": True, "reduce_range": weights_reduce_range(), "keep_fp32": keep,
                                "sensitivity": {k: {"output_error": round(v["output_error"], 6), "macs": v["macs"]}
                                                for k, v in ranks.get(part, {}).items()} or None}
            meta = copy.deepcopy(artifact.meta)
            meta.pop("format_version", None)
            meta["parity"] = {**meta.get("parity", {}), "graphs": "the fp32 graphs before quantization"}
            meta["quantization"] = {"dtype": "int8", "requested_mode": mode, "graphs": graphs, "calibration": calib,
                                    "threads": threads, "keep_fp32_fraction": fraction}
            trial = scratch / f"trial{i}"
            _write_folder(trial, artifact, files, meta)  # the gate loads the folder through its sidecar
            figures = compare_backends(fp32, OrtBackend(trial, threads=threads), gate_set, reference)
            attempts.append({"keep_fp32_fraction": fraction, **{k: v for k, v in figures.items() if k != "rows"}})
            if not _failures(figures, gate):
                passed = (files, meta, figures)
                break
        if passed is None:
            best = max(attempts, key=lambda a: a["mean_dice_to_fp32"])
            tried = "; ".join(f"{a['keep_fp32_fraction']:.0%} of int8 layers kept fp32: Dice {a['mean_dice_to_fp32']:.4f}, "
                              f"logit error mean {a['logit_mean_abs']:.3f} max {a['logit_max_abs']:.2f}"
                              for a in attempts)
            last = figures
            try:
                accuracy_gate(last, gate, f"int8 export to {out}")
            except ExportError as exc:
                raise ExportError(f"{exc}" + (f" [tried: {tried}; best Dice {best['mean_dice_to_fp32']:.4f}]"
                                              if len(attempts) > 1 else "")) from None
        files, meta, figures = passed
        meta["quantization"]["gate"] = {"reference": "onnxruntime fp32 export (same graphs before quantization)",
                                        "prompt": "one tight box per object, single-mask output",
                                        "held_out": held_out, "thresholds": gate.to_dict(), **figures}
        meta["quantization"]["attempts"] = attempts
        meta["quantization"]["seconds"] = round(time.perf_counter() - t0, 2)
        with staging_folder(out) as stage:
            _write_folder(stage, artifact, files, meta)
    return meta


def export_onnx_int8(model, out_dir, *, mode: str = "auto", calibration=None,
                     calibration_slices: int = DEFAULT_CALIBRATION_SLICES, gate_slices: int = DEFAULT_GATE_SLICES,
                     gate: QuantGate | None = None, threads: int | None = None, **export_options) -> dict:
    """`export_onnx` (fp32, parity-gated against torch) into a scratch folder, then `quantize_export` into
    `out_dir`. Options are checked before any tracing."""
    from .onnx_export import export_onnx

    if mode not in QUANT_MODES:
        raise ExportError(f"--quant-mode: expected one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "static" and calibration is None:
        raise ExportError("--quant-mode static: needs --calibration MANIFEST (shards of your data at the model's "
                          "size) to calibrate activation ranges; or use --quant-mode dynamic")
    (gate or QuantGate()).check()
    if calibration is not None:
        _check_manifest_size(calibration, model.img_size)
    out = Path(out_dir)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fp32-export.", dir=out.resolve().parent) as scratch:
        export_onnx(model, Path(scratch) / "fp32", threads=threads, **export_options)
        return quantize_export(Path(scratch) / "fp32", out, mode=mode, calibration=calibration,
                               calibration_slices=calibration_slices, gate_slices=gate_slices, gate=gate,
                               threads=threads)


def _check_manifest_size(calibration, img_size: int) -> None:
    from ..data.manifest import load_manifest

    path = Path(calibration)
    path = path / "manifest.json" if path.is_dir() else path
    m = load_manifest(path)
    if int(m.image_size) != int(img_size):
        raise DataError(f"{path}: image_size {m.image_size} does not match the model's input size {img_size}; "
                        f"convert the calibration shards with --size {img_size}")


def is_quantized(meta: dict) -> bool:
    return isinstance(meta, dict) and "quantization" in meta


__all__ = ["QuantGate", "QUANT_MODES", "QUANT_OP_TYPES", "quantize_export", "export_onnx_int8", "quantize_graph",
           "compare_backends", "accuracy_gate", "load_slices", "time_graph", "is_quantized", "sensitivity",
           "output_sensitivity"]
