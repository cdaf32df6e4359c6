"""TensorRT path without TensorRT: mixed-precision conversion, low-res decoder graph, profiles,
engine compatibility checks. The engine build itself skips without TensorRT and a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is the `export` extra")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from medico_peft.errors import ExportError  # noqa: E402
from medico_peft.export import tensorrt_build as tb  # noqa: E402
from medico_peft.export.mixed_precision import convert_to_mixed_precision, precision_summary  # noqa: E402
from medico_peft.export.onnx_export import export_onnx  # noqa: E402
from medico_peft.models import load_model  # noqa: E402
from medico_peft.runtime.artifacts import check_engine_compat, check_shapes_fit  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "onnx"
    export_onnx(load_model("vit_tiny"), out, parity_random=1, parity_real=0)
    return out


def _decoder_feed(n_points=3, h=100.0, w=128.0):
    rng = np.random.default_rng(0)
    return {"image_embeddings": rng.normal(size=(1, 32, 8, 8)).astype(np.float32),
            "point_coords": rng.uniform(0, 90, (1, n_points, 2)).astype(np.float32),
            "point_labels": np.array([[1, 0, -1][:n_points]], np.float32),
            "mask_input": np.zeros((1, 1, 32, 32), np.float32), "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([h, w], np.float32)}


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_mixed_precision_keeps_sensitive_ops_and_io_fp32_and_stays_close(tiny_dir, part):
    fp32 = onnx.load(str(tiny_dir / f"{part}.onnx"))
    fp16 = convert_to_mixed_precision(fp32, "fp16")
    onnx.checker.check_model(fp16, full_check=True)
    summary = precision_summary(fp16)
    for op in ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"):
        if op in summary:
            assert summary[op]["low"] == 0, op
    assert summary["MatMul"]["low"] > 0  # the heavy ops did move to fp16
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(fp16.graph.input) + list(fp16.graph.output))
    feed = ({"image": np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)} if part == "encoder"
            else _decoder_feed())
    ref = ort.InferenceSession(fp32.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(fp16.SerializeToString()).run(None, feed)
    for a, b in zip(ref, got):
        assert b.dtype == np.float32 and np.abs(a - b).max() < 2e-2 * max(1.0, np.abs(a).max())


def test_bf16_conversion_is_valid_onnx(tiny_dir):
    bf16 = convert_to_mixed_precision(onnx.load(str(tiny_dir / "encoder.onnx")), "bf16")
    onnx.checker.check_model(bf16, full_check=True)
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in bf16.graph.initializer)


def test_low_res_decoder_has_no_resize_and_matches_full_graph(tiny_dir):
    full = onnx.load(str(tiny_dir / "decoder.onnx"))
    low = tb.strip_full_res_output(full)
    assert [o.name for o in low.graph.output] == ["iou_predictions", "low_res_masks"]
    assert "Resize" not in {n.op_type for n in low.graph.node}  # orig_im_size feeds arithmetic only
    assert "orig_im_size" in {i.name for i in low.graph.input}
    for n in (2, 3):
        feed = _decoder_feed(n, h=300, w=90)
        masks, iou, low_ref = ort.InferenceSession(full.SerializeToString()).run(None, feed)
        iou2, low2 = ort.InferenceSession(low.SerializeToString()).run(None, feed)
        np.testing.assert_array_equal(low2, low_ref)
        np.testing.assert_array_equal(iou2, iou)


def test_profiles_and_points_outside_profile():
    prof = tb.decoder_profile(8)
    assert prof["point_coords"] == [[1, 1, 2], [1, 4, 2], [1, 8, 2]]
    check_shapes_fit(prof, {"point_coords": (1, 8, 2), "point_labels": (1, 8)}, "decoder.engine")
    with pytest.raises(ExportError, match=r"9 points .* built for 1\.\.8: rebuild with a larger --max-points"):
        check_shapes_fit(prof, {"point_coords": (1, 9, 2), "point_labels": (1, 9)}, "decoder.engine")
    assert tb.encoder_profile(256, False) == {}
    assert tb.encoder_profile(256, True)["image"][1] == [256, 256, 3]
    with pytest.raises(ExportError, match="max-points"):
        tb.decoder_profile(0)


def test_typing_mode_by_tensorrt_version():
    assert not tb.uses_strong_typing("10.13.0.35", "fp16")
    assert tb.uses_strong_typing("11.0.0", "fp16") and tb.uses_strong_typing("11.1", "fp32")


def test_engine_from_another_gpu_or_tensorrt_version_refused():
    built = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    check_engine_compat(built, dict(built), "engine.json")
    with pytest.raises(ExportError, match=r"built for TensorRT 10.13.0 \(running 11.0.0\).*rebuild"):
        check_engine_compat(built, {**built, "tensorrt_version": "11.0.0"}, "engine.json")
    with pytest.raises(ExportError, match=r"compute capability \(9, 0\) \(running \(8, 0\)\)"):
        check_engine_compat(built, {**built, "compute_capability": [8, 0], "gpu_name": "A100"}, "engine.json")
    with pytest.raises(ExportError, match="GPU 'NVIDIA H100 80GB HBM3'"):
        check_engine_compat(built, {**built, "gpu_name": "NVIDIA H200"}, "engine.json")


def test_build_without_tensorrt_is_a_clear_error(tiny_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT installed: the error path is not reachable")
    except ImportError:
        pass
    with pytest.raises(ExportError, match="TensorRT is not installed.*pip install tensorrt.*CUDA GPU"):
        tb.build_engines(tiny_dir, tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; none here")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_parity_and_predictor(tiny_dir, tmp_path, precision):
    pytest.importorskip("tensorrt", reason="tensorrt not installed (pip install tensorrt); engines also need a CUDA GPU")
    from medico_peft.runtime import Predictor

    meta = tb.build_engines(tiny_dir, tmp_path / precision, precision=precision, max_points=8,
                            timing_cache=str(tmp_path / "timing.cache"))
    assert meta["parity"]["max"]["mask_mismatch"] <= tb.TOLERANCES[precision].mask_mismatch
    assert (tmp_path / "timing.cache").stat().st_size > 0
    img = np.random.default_rng(0).integers(0, 255, (90, 140), dtype=np.uint8)
    a = Predictor.from_tensorrt(tmp_path / precision).set_image(img).predict(box=[10, 10, 100, 80])
    b = Predictor.from_onnx(tiny_dir).set_image(img).predict(box=[10, 10, 100, 80])
    assert (a.masks != b.masks).mean() < 0.02
