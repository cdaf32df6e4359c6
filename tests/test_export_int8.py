"""int8 ONNX export: quantized graphs behind an accuracy gate against the fp32 export, on real Colin27 slices.

The tiny random model (vit_tiny, 128²) keeps this fast; its masks say nothing about accuracy, so the gate's
thresholds here are chosen to pass or to fail on purpose. The gate's figures are checked against an
independent reference: onnxruntime sessions opened directly on the fp32 and int8 graph files.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from conftest import requires_mricron  # noqa: E402
from medico_peft.errors import DataError, ExportError  # noqa: E402
from medico_peft.export.onnx_export import export_onnx  # noqa: E402
from medico_peft.export.quantize import QuantGate, load_slices, quantize_export  # noqa: E402
from medico_peft.models import load_model  # noqa: E402

pytestmark = requires_mricron
LOOSE = QuantGate(min_dice=0.0, max_logit_mean=1e9, max_logit_max=1e9)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from medico_peft.data.real_data import build_colin27_aal_shards

    root = tmp_path_factory.mktemp("int8")
    export_onnx(load_model("vit_tiny"), root / "fp32", parity_random=1, parity_real=0)
    build_colin27_aal_shards(root / "shards", size=128)
    return root


@pytest.fixture(scope="module")
def dynamic(work):
    meta = quantize_export(work / "fp32", work / "dyn", mode="dynamic", calibration=work / "shards",
                           calibration_slices=3, gate_slices=3, gate=LOOSE, threads=1)
    return work / "dyn", meta


def _ops(path) -> dict:
    import onnx

    counts = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_dynamic_export_writes_int8_graphs_and_sidecar(work, dynamic):
    out, meta = dynamic
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "export.json"]
    side = json.loads((out / "export.json").read_text())
    q = side["quantization"]
    assert q["dtype"] == "int8" and q["requested_mode"] == "dynamic"
    assert {part: g["mode"] for part, g in q["graphs"].items()} == {"encoder": "dynamic", "decoder": "dynamic"}
    manifest = work / "shards" / "manifest.json"
    assert q["calibration"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert len(q["calibration"]["slices"]) == 3 and q["calibration"]["source"] == str(manifest)
    gate = q["gate"]
    assert gate["held_out"] and gate["slices"] == 3 and gate["thresholds"] == LOOSE.to_dict()
    assert not set(q["calibration"]["slices"]) & {r["slice"] for r in gate["rows"]}  # held out
    assert all(r["split"] != "train" for r in gate["rows"])
    for part in ("encoder", "decoder"):
        ops, ref = _ops(out / f"{part}.onnx"), _ops(work / "fp32" / f"{part}.onnx")
        assert ops.get("MatMulInteger", 0) > 0 and ops.get("DynamicQuantizeLinear", 0) > 0
        # LayerNorm and Softmax stay fp32 ops (quantization touches MatMul/Gemm only)
        assert ops.get("Softmax", 0) == ref.get("Softmax", 0)
        assert side["files"][part]["sha256"] == hashlib.sha256((out / f"{part}.onnx").read_bytes()).hexdigest()
    assert (out / "encoder.onnx").stat().st_size < (work / "fp32" / "encoder.onnx").stat().st_size


def test_gate_figures_match_onnxruntime_run_directly(work, dynamic):
    """Independent reference: plain onnxruntime sessions on the two folders' graph files, the box prompt and
    the Dice computed here, reproduce the sidecar's first gate row."""
    import onnxruntime as ort

    from medico_peft.data.prompts import mask_box
    from medico_peft.runtime.preprocess import build_prompt_arrays, preprocess_image

    import torch

    out, meta = dynamic
    _, gate_slices, _ = load_slices(work / "shards", 128, 3, 3)
    row = meta["quantization"]["gate"]["rows"][0]
    s = gate_slices[0]
    assert s.where == row["slice"]
    h, w = s.image.shape[:2]
    x = preprocess_image(torch.from_numpy(s.image), 128, "div255", pad_value=meta["model"]["spec"]["pixel_mean"]).numpy()
    logits = {}
    for name, folder in (("fp32", work / "fp32"), ("int8", out)):
        enc = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
        (emb,) = enc.run(None, {"image": x})
        logits[name] = []
        for mask in s.masks:
            coords, labels = build_prompt_arrays((h, w), box=mask_box(mask).astype(np.float32))
            masks, _, _ = dec.run(None, {"image_embeddings": emb, "point_coords": coords, "point_labels": labels,
                                         "mask_input": np.zeros((1, 1, 32, 32), np.float32),
                                         "has_mask_input": np.zeros(1, np.float32),
                                         "orig_im_size": np.array([h, w], np.float32)})
            logits[name].append(masks[0, 0].astype(np.float64))
    dice = []
    for a, b in zip(logits["fp32"], logits["int8"]):
        pa, pb = a > 0, b > 0
        dice.append(1.0 if pa.sum() + pb.sum() == 0 else 2 * (pa & pb).sum() / (pa.sum() + pb.sum()))
    assert row["dice_to_fp32"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert row["logit_max_abs"] == pytest.approx(max(np.abs(a - b).max() for a, b in zip(logits["fp32"], logits["int8"])),
                                                 rel=1e-4, abs=1e-5)
    assert row["logit_mean_abs"] > 0  # int8 changes the logits


def test_quantized_folder_predicts_through_the_onnx_predictor(work, dynamic):
    from medico_peft.runtime.predictor import Predictor

    out, _ = dynamic
    _, gate_slices, _ = load_slices(work / "shards", 128, 3, 3)
    s = gate_slices[1]
    from medico_peft.data.prompts import mask_box

    box = mask_box(s.masks[0]).astype(np.float32)
    p8 = Predictor.from_onnx(out, threads=1).set_image(s.image).predict(box=box)
    p32 = Predictor.from_onnx(work / "fp32", threads=1).set_image(s.image).predict(box=box)
    assert p8.masks.shape == p32.masks.shape == (1, *s.image.shape[:2])
    assert np.isfinite(p8.logits).all() and not np.array_equal(p8.logits, p32.logits)
    assert np.abs(p8.logits - p32.logits).max() <= json.loads((out / "export.json").read_text())[
        "quantization"]["gate"]["logit_max_abs"] * 10 + 1


def test_failing_gate_writes_nothing_and_names_the_figure(work, dynamic):
    out = work / "keep"
    shutil.copytree(dynamic[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"max abs logit error [0-9.]+, threshold <= 0 \(--gate-logit-max"):
        quantize_export(work / "fp32", out, mode="dynamic", calibration=work / "shards", calibration_slices=2,
                        gate_slices=2, gate=QuantGate(min_dice=0.0, max_logit_mean=1e9, max_logit_max=0.0), threads=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no staging or scratch left behind
    with pytest.raises(ExportError, match=r"mean mask Dice to fp32 [0-9.]+, threshold >= 1\.01|--gate-dice"):
        quantize_export(work / "fp32", work / "never", mode="dynamic", calibration=work / "shards",
                        gate=QuantGate(min_dice=1.01))
    assert not (work / "never").exists()


def test_static_mode_writes_qdq_graphs_and_auto_keeps_the_fastest(work):
    meta = quantize_export(work / "fp32", work / "auto", mode="auto", calibration=work / "shards",
                           calibration_slices=2, gate_slices=2, gate=LOOSE, threads=1, timing_repeats=1)
    for part, g in meta["quantization"]["graphs"].items():
        times = g["seconds_per_run"]
        assert set(times) == {"fp32", "dynamic", "static"} and g["mode"] == min(times, key=times.get)
    static = quantize_export(work / "fp32", work / "static", mode="static", calibration=work / "shards",
                             calibration_slices=2, gate_slices=2, gate=LOOSE, threads=1)
    assert static["quantization"]["graphs"]["encoder"]["mode"] == "static"
    ops = _ops(work / "static" / "encoder.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0


def test_bad_inputs_are_refused_with_one_clear_error(work, dynamic, tmp_path, capsys):
    from medico_peft.cli import main
    from medico_peft.data.real_data import build_colin27_aal_shards

    with pytest.raises(ExportError, match="--quant-mode static: needs --calibration"):
        quantize_export(work / "fp32", tmp_path / "a", mode="static")
    build_colin27_aal_shards(tmp_path / "s64", size=64)
    with pytest.raises(DataError, match=r"image_size 64 does not match the model's input size 128"):
        quantize_export(work / "fp32", tmp_path / "b", mode="dynamic", calibration=tmp_path / "s64")
    with pytest.raises(ExportError, match="already quantized"):
        quantize_export(dynamic[0], tmp_path / "c", mode="dynamic", calibration=work / "shards")
    for argv, message in (
            (["export", "tensorrt", "--onnx", str(work / "fp32"), "--out", str(tmp_path / "t"), "--quantize", "int8"],
             "--quantize: int8 quantization is for onnxruntime on CPU"),
            (["export", "onnx", "--model", "vit_tiny", "--out", str(tmp_path / "o"), "--quantize", "int8",
              "--precision", "fp16"], "--precision: TensorRT option"),
            (["export", "onnx", "--model", "vit_tiny", "--out", str(tmp_path / "o"), "--calibration", "x"],
             "--calibration: only with --quantize int8"),
            (["export", "onnx", "--model", "vit_tiny", "--out", str(tmp_path / "o"), "--quantize", "int8",
              "--quant-mode", "static"], "--quant-mode static: needs --calibration")):
        capsys.readouterr()
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "o").exists()


def test_tensorrt_build_refuses_an_int8_folder(work, dynamic, tmp_path):
    from medico_peft.export.tensorrt_build import build_engines

    with pytest.raises(ExportError, match="int8 export for onnxruntime on CPU"):
        build_engines(dynamic[0], tmp_path / "engines")


def test_cli_writes_an_int8_export(work, tmp_path, capsys):
    from medico_peft.cli import main

    out = tmp_path / "cli"
    assert main(["export", "onnx", "--model", "vit_tiny", "--out", str(out), "--quantize", "int8", "--quant-mode",
                 "dynamic", "--calibration", str(work / "shards"), "--calibration-slices", "2", "--gate-slices", "2",
                 "--gate-dice", "0", "--gate-logit-mean", "1e9", "--gate-logit-max", "1e9", "--parity-images", "1",
                 "--real-images", "0", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "int8: encoder dynamic, decoder dynamic" in printed and "mean mask Dice to fp32" in printed
    side = json.loads((out / "export.json").read_text())
    assert side["quantization"]["gate"]["thresholds"]["min_dice"] == 0.0
    assert side["parity"]["graphs"] == "the fp32 graphs before quantization"


def test_keep_fp32_leaves_the_most_error_prone_layers_unquantized(work, tmp_path):
    from medico_peft.export.quantize import calibration_feeds, quantize_graph, sensitivity
    from medico_peft.runtime.ort_backend import OrtBackend

    cal, _, _ = load_slices(work / "shards", 128, 2, 1)
    feeds = calibration_feeds(OrtBackend(work / "fp32", threads=1), cal)["encoder"]
    ranked = sensitivity(work / "fp32" / "encoder.onnx", feeds, work_dir=tmp_path)
    values = list(ranked.values())
    weighted = _ops(work / "fp32" / "encoder.onnx")
    assert 0 < len(ranked) <= weighted.get("Gemm", 0) + weighted.get("MatMul", 0)
    assert values == sorted(values, reverse=True) and all(0 < v < 1 for v in values)
    full = quantize_graph(work / "fp32" / "encoder.onnx", tmp_path / "full" / "encoder.onnx", "dynamic")
    part = quantize_graph(work / "fp32" / "encoder.onnx", tmp_path / "part" / "encoder.onnx", "dynamic",
                          keep_fp32=list(ranked)[:2])
    assert _ops(part)["MatMulInteger"] == _ops(full)["MatMulInteger"] - 2


def test_auto_mode_retries_with_fp32_layers_and_lists_every_try(work):
    with pytest.raises(ExportError, match=r"\[tried: 0% of int8 layers kept fp32: Dice [0-9.]+.*; 50% of int8 layers "
                                          r"kept fp32: Dice [0-9.]+"):
        quantize_export(work / "fp32", work / "ladder", mode="dynamic", calibration=work / "shards",
                        calibration_slices=2, gate_slices=2, fp32_fractions=(0.0, 0.5),
                        gate=QuantGate(min_dice=0.0, max_logit_mean=1e9, max_logit_max=0.0), threads=1)
    assert not (work / "ladder").exists()


@pytest.mark.slow
def test_litemedsam_int8_on_colin27_keeps_label_dice(tmp_path):
    """Real LiteMedSAM, real Colin27 slices: dynamic int8 (both graphs) stays close to fp32 in Dice to the AAL
    labels; its mask Dice to fp32 is what bench_quantize reports (about 0.92, below the 0.98 default gate)."""
    from medico_peft.data.real_data import build_colin27_aal_shards
    from medico_peft.export.quantize import export_onnx_int8

    build_colin27_aal_shards(tmp_path / "shards", size=256)
    with pytest.raises(ExportError, match="mean mask Dice to fp32 0\\.9[0-9]+, threshold >= 0.98"):
        export_onnx_int8(load_model("litemedsam"), tmp_path / "refused", mode="dynamic",
                         calibration=tmp_path / "shards", parity_random=1, parity_real=0, threads=2)
    assert not (tmp_path / "refused").exists()
    meta = export_onnx_int8(load_model("litemedsam"), tmp_path / "int8", mode="dynamic",
                            calibration=tmp_path / "shards", gate=QuantGate(min_dice=0.9), parity_random=1,
                            parity_real=0, threads=2)
    g = meta["quantization"]["gate"]
    assert g["held_out"] and g["mean_dice_to_fp32"] >= 0.9
    assert abs(g["mean_dice_to_labels_int8"] - g["mean_dice_to_labels_fp32"]) < 0.03


def test_export_onnx_int8_uses_builtin_colin27_without_calibration_and_in_graph_preprocessing(work, tmp_path):
    from medico_peft.export.quantize import export_onnx_int8
    from medico_peft.runtime.predictor import Predictor

    meta = export_onnx_int8(load_model("vit_tiny"), tmp_path / "pre", mode="auto", gate=LOOSE, calibration_slices=2,
                            gate_slices=2, with_preprocess=True, parity_random=1, parity_real=0, threads=1)
    q = meta["quantization"]
    assert q["calibration"]["source"] == "built-in Colin27 T1 + AAL atlas" and q["calibration"]["manifest_sha256"] is None
    for g in q["graphs"].values():  # no static candidate without the user's calibration data
        assert set(g["seconds_per_run"]) == {"fp32", "dynamic"} and g["mode"] in ("fp32", "dynamic")
    assert meta["with_preprocess"] and q["gate"]["held_out"]
    image = np.random.default_rng(0).integers(0, 255, (100, 128, 3), dtype=np.uint8)
    pred = Predictor.from_onnx(tmp_path / "pre", threads=1).set_image(image).predict(box=[10, 10, 90, 80])
    assert pred.masks.shape == (1, 100, 128)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_sensitivity_ranks_by_output_error_per_work_and_matches_a_real_int8_layer(work, tmp_path):
    """Each layer's end-to-end error, emulated in the fp32 graph, against an independent reference: onnxruntime's
    own dynamic quantization of that one layer (every other layer excluded), run on the same feeds."""
    import onnxruntime as ort

    from medico_peft.export.quantize import calibration_feeds, output_sensitivity, quantize_graph, sensitivity
    from medico_peft.runtime.ort_backend import OrtBackend

    cal, _, _ = load_slices(work / "shards", 128, 2, 1)
    feeds = calibration_feeds(OrtBackend(work / "fp32", threads=1), cal)["encoder"]
    src = work / "fp32" / "encoder.onnx"
    ranked = output_sensitivity(src, feeds, work_dir=tmp_path, threads=1)
    assert set(ranked) == set(sensitivity(src, feeds, work_dir=tmp_path))  # the same layers, same (pre-processed) names
    scores = [v["output_error"] ** 2 / v["macs"] for v in ranked.values()]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < v["output_error"] < 1 and v["macs"] > 0 for v in ranked.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    first, *others = list(ranked)
    one = quantize_graph(src, tmp_path / "one" / "encoder.onnx", "dynamic", keep_fp32=others)
    assert _ops(one).get("MatMulInteger", 0) == 1
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(one), providers=["CPUExecutionProvider"])
    errs = []
    for feed in feeds[:2]:
        for a, b in zip(ref.run(None, feed), q.run(None, feed)):
            errs.append(np.linalg.norm(b.astype(np.float64) - a) / np.linalg.norm(a))
    assert 0.5 < ranked[first]["output_error"] / np.mean(errs) < 2.0


def test_auto_ladder_leaves_the_ranked_layers_fp32_in_the_written_graph(work):
    import onnx
    from onnx import TensorProto

    meta = quantize_export(work / "fp32", work / "half", mode="dynamic", calibration=work / "shards",
                           calibration_slices=2, gate_slices=2, gate=LOOSE, threads=1, fp32_fractions=(0.5,))
    for part, g in meta["quantization"]["graphs"].items():
        ranking = list(g["sensitivity"])
        assert g["keep_fp32"] == ranking[:round(0.5 * len(ranking))] and g["keep_fp32"]
        graph = onnx.load(str(work / "half" / f"{part}.onnx")).graph
        floats = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
        by_name = {n.name: n for n in graph.node}
        for name in g["keep_fp32"]:  # still a float MatMul/Gemm on its float weight (onnxruntime writes a Gemm
            # as MatMul "<name>_MatMul" + Add), and no int8 twin ("<...>_quant")
            node = by_name.get(name) or by_name[f"{name}_MatMul"]
            assert node.op_type in ("MatMul", "Gemm") and node.input[1] in floats, name
            assert f"{name}_MatMul_quant" not in by_name and f"{name}_quant" not in by_name
        assert _ops(work / "half" / f"{part}.onnx")["MatMulInteger"] == len(ranking) - len(g["keep_fp32"])
    assert meta["quantization"]["keep_fp32_fraction"] == 0.5


def test_bad_fp32_fractions_are_refused_naming_the_option(work):
    for bad in ((1.0,), (0.0, -0.25), ()):
        with pytest.raises(ExportError, match=r"fp32_fractions: expected shares of int8 layers kept fp32, each in "
                                              r"\[0, 1\), got"):
            quantize_export(work / "fp32", work / "never_frac", mode="dynamic", calibration=work / "shards",
                            gate=LOOSE, fp32_fractions=bad)
        assert not (work / "never_frac").exists()


def test_weights_are_7_bit_on_cpus_without_vnni_and_8_bit_with_it(work, tmp_path):
    """reduce_range follows the CPU (non-VNNI x86 kernels saturate with full-range int8 weights), and the graph
    onnxruntime writes holds weights on that grid: |w| ≤ 64 with reduce_range, up to 127 without."""
    import onnx
    from onnx import numpy_helper

    from medico_peft.export.quantize import quantize_graph, weights_reduce_range

    assert weights_reduce_range("flags : fpu sse4_2 avx avx2 fma") is True
    assert weights_reduce_range("flags : fpu sse4_2 avx2 avx512f avx512_vnni") is False
    assert weights_reduce_range("flags : fpu sse4_2 avx2 avx_vnni") is False
    assert weights_reduce_range("Features : fp asimd") is False  # not x86: no such kernels
    peaks = {}
    for reduce in (True, False):
        out = quantize_graph(work / "fp32" / "decoder.onnx", tmp_path / str(reduce) / "decoder.onnx", "dynamic",
                             reduce_range=reduce)
        ints = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer
                if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_quantized")]
        assert ints
        peaks[reduce] = max(int(np.abs(a.astype(np.int32)).max()) for a in ints)
    assert peaks[True] <= 64 < peaks[False] <= 127
