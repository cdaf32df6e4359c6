"""Semantic export: one ONNX graph image → class logits (LoRA merged), its parity gate, the semantic
Predictor entry point on torch / onnxruntime (TensorRT on a GPU), and the task / input-size refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from _semantic_helpers import CLASSES, image_of_aspect, save_tiny_adapter, tiny_semantic  # noqa: E402
from medico_peft.errors import ConfigError, DataError, ExportError  # noqa: E402
from medico_peft.export import semantic_export as se  # noqa: E402
from medico_peft.export.fuse import fuse_semantic  # noqa: E402
from medico_peft.models import load_model  # noqa: E402
from medico_peft.runtime import Predictor  # noqa: E402

ASPECTS = [(128, 128), (90, 120), (72, 128), (200, 70)]  # 1:1, 3:4, 16:9, tall


@pytest.fixture(scope="module")
def unetr(tmp_path_factory):
    """(unmerged LoRA model, its adapter file, the export folder made from the file)."""
    root = tmp_path_factory.mktemp("sem_unetr")
    model = tiny_semantic("unetr")
    adapter = save_tiny_adapter(model, root / "sem.safetensors")
    meta = se.export_semantic_adapter(load_model("vit_tiny"), adapter, root / "onnx", parity_real=1)
    return model, adapter, root / "onnx", meta


@pytest.fixture(scope="module")
def samed_pp(tmp_path_factory):
    """SAMed head exported with in-graph preprocessing (uint8 H×W×3 in, logits at the original size out)."""
    root = tmp_path_factory.mktemp("sem_samed")
    model = tiny_semantic("samed")
    fused, info = fuse_semantic(model)
    meta = se.export_semantic_onnx(fused, root / "onnx", with_preprocess=True, adapter_info=info, parity_real=1)
    return model, root / "onnx", meta


@pytest.fixture(scope="module")
def interactive_dir(tmp_path_factory):
    from medico_peft.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("inter") / "onnx"
    export_onnx(load_model("vit_tiny"), out, parity_random=1, parity_real=0)
    return out


def test_export_writes_one_graph_and_a_semantic_sidecar(unetr):
    model, adapter, out, meta = unetr
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "semantic.onnx"]
    side = json.loads((out / "export.json").read_text())
    assert side["task"] == "semantic" and side["semantic"]["class_names"] == list(CLASSES)
    assert side["semantic"]["num_classes"] == 3 and side["semantic"]["kind"] == "unetr"
    assert side["semantic"]["logits_at"] == "model"
    assert side["io"]["semantic"]["inputs"] == [{"name": "image", "shape": [1, 3, 128, 128], "dtype": "float32"}]
    assert side["fuse"]["method"] == "lora" and side["fuse"]["fuse_max_abs_error"] < 1e-4
    from medico_peft.utils.hashing import sha256_file

    assert side["adapter"]["sha256"] == sha256_file(adapter)
    images = {r["image"] for r in side["parity"]["rows"]}
    assert any("MNI152" in i for i in images) and any("tall" in i for i in images)
    assert side["parity"]["max"]["nonfinite"] == 0 and side["parity"]["max"]["logits"] <= 1e-2


def test_merged_graph_has_no_lora_and_the_fused_model_matches_the_unmerged(unetr):
    import onnx

    model, _, out, _ = unetr
    names = [t.name for t in onnx.load(str(out / "semantic.onnx")).graph.initializer]
    assert names and not any("lora" in n for n in names)
    fused, info = fuse_semantic(model)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert float((fused(x) - model(x)).abs().max()) < 1e-4
    assert not any("lora" in n for n, _ in fused.named_parameters())
    assert any("lora" in n for n, _ in model.named_parameters())  # the unmerged model is left as it was


def test_onnx_logits_equal_torch_and_labels_agree_across_backends(unetr):
    model, _, out, _ = unetr
    torch_p, ort_p = Predictor.from_torch(model), Predictor.from_onnx(out)
    assert torch_p.task == ort_p.task == "semantic" and ort_p.class_names == list(CLASSES)
    for h, w in ASPECTS[:3]:
        img = image_of_aspect(h, w)
        a, b = torch_p.predict_semantic(img), ort_p.predict_semantic(img)
        assert a.logits.shape == b.logits.shape == (3, h, w) and a.labels.shape == (h, w)
        assert a.labels.dtype == np.uint8
        assert float(np.abs(a.logits - b.logits).max()) <= 1e-4, (h, w)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.labels, a.logits.argmax(0))


def test_in_graph_preprocessing_returns_logits_at_every_original_size(samed_pp):
    import onnxruntime as ort

    model, out, meta = samed_pp
    assert meta["semantic"]["logits_at"] == "original" and meta["semantic"]["kind"] == "samed"
    assert meta["io"]["semantic"]["inputs"][0] == {"name": "image", "shape": ["height", "width", 3], "dtype": "uint8"}
    sess = ort.InferenceSession(str(out / "semantic.onnx"), providers=["CPUExecutionProvider"])
    torch_p, ort_p = Predictor.from_torch(model), Predictor.from_onnx(out)
    for h, w in ASPECTS + [(37, 251)]:
        img = image_of_aspect(h, w, seed=h)
        (logits,) = sess.run(None, {"image": np.repeat(img[..., None], 3, axis=2)})
        assert logits.shape == (1, 3, h, w)
        ref = torch_p.predict_semantic(img)
        assert float(np.abs(logits[0] - ref.logits).max()) <= 1e-4, (h, w)
        np.testing.assert_array_equal(ort_p.predict_semantic(img).labels, ref.labels)


def _corrupt(path, how: str):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path))
    biggest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(biggest).copy()
    if how == "nan":
        arr.flat[0] = np.nan
    else:
        arr *= 1.5
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(graph, str(path))


@pytest.mark.parametrize("how, message", [("scale", r"parity gate failed: logits max error"),
                                          ("nan", r"parity gate failed: \d+ NaN/Inf")])
def test_parity_gate_refuses_a_corrupted_graph_and_writes_nothing(tmp_path, monkeypatch, how, message):
    model, _ = fuse_semantic(tiny_semantic("samed"))
    real = se.trace_semantic

    def corrupting(model, stage, *args):
        real(model, stage, *args)
        _corrupt(stage / se.GRAPH, how)

    monkeypatch.setattr(se, "trace_semantic", corrupting)
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match=message):
        se.export_semantic_onnx(model, out, parity_random=2, parity_real=0)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left behind


def test_gate_on_a_copied_folder_with_a_corrupted_graph(unetr, tmp_path):
    import shutil

    from medico_peft.runtime.ort_backend import OrtSemanticBackend

    model, _, out, _ = unetr
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _corrupt(copy / "semantic.onnx", "scale")
    rows = se.run_semantic_parity(model, OrtSemanticBackend(copy), n_random=1, n_real=0)
    with pytest.raises(ExportError, match="parity gate failed: logits"):
        se.semantic_gate(rows, se.SemanticTolerance(), "copied export")


def test_semantic_and_interactive_exports_refuse_the_other_task(unetr, interactive_dir):
    from medico_peft.runtime.ort_backend import OrtBackend, OrtSemanticBackend

    _, _, sem_dir, _ = unetr
    with pytest.raises(ExportError, match=r"semantic export \(3 classes: background, ball_a, ball_b\).*predict_semantic"):
        OrtBackend(sem_dir)
    with pytest.raises(ExportError, match="interactive export .* not a semantic one"):
        OrtSemanticBackend(interactive_dir)
    sem = Predictor.from_onnx(sem_dir)
    img = image_of_aspect(64, 64)
    with pytest.raises(ConfigError, match=r"set_image: .* semantic model .*predict_semantic\(image\)"):
        sem.set_image(img)
    with pytest.raises(ConfigError, match=r"predict: .* semantic model .*predict --semantic"):
        sem.predict(box=[1, 1, 20, 20])
    inter = Predictor.from_onnx(interactive_dir)
    assert inter.task == "interactive" and inter.class_names is None
    with pytest.raises(ConfigError, match="predict_semantic: .* interactive model .* no class head"):
        inter.predict_semantic(img)
    with pytest.raises(ConfigError, match="interactive model"):
        Predictor.from_torch(load_model("vit_tiny")).predict_semantic(img)
    with pytest.raises(ExportError, match="expected a SemanticSam"):
        se.export_semantic_onnx(load_model("vit_tiny"), sem_dir.parent / "never")


def test_wrong_size_or_channels_for_the_exported_graph_are_clear_errors(unetr, samed_pp):
    from medico_peft.runtime.artifacts import check_shapes_fit
    from medico_peft.runtime.ort_backend import OrtSemanticBackend

    _, _, out, _ = unetr
    backend = OrtSemanticBackend(out)
    with pytest.raises(DataError, match=r"image: shape \(1, 3, 64, 64\) does not fit the exported semantic graph, "
                                        r"which takes 1×3×128×128 .*pass the original image to the Predictor"):
        backend.run_graph(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(DataError, match=r"shape \(3, 128, 128\) does not fit"):
        backend.run_graph(np.zeros((3, 128, 128), np.float32))
    with pytest.raises(DataError, match="dtype float64 does not fit the exported semantic graph, which takes float32"):
        backend.run_graph(np.zeros((1, 3, 128, 128), np.float64))
    p = Predictor.from_onnx(out)
    with pytest.raises(DataError, match=r"image: shape \(64, 64, 4\) .* expected H×W, H×W×1 or H×W×3"):
        p.predict_semantic(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(DataError, match=r"shape \(20, 30, 8\) has 8 channels.*predict_semantic_volume"):
        p.predict_semantic(np.zeros((20, 30, 8), np.float32))
    with pytest.raises(DataError, match="too small"):
        p.predict_semantic(np.zeros((1, 40), np.uint8))
    # in-graph preprocessing: any size runs; a TensorRT engine takes only the sides of its profile
    _, pp_dir, _ = samed_pp
    assert Predictor.from_onnx(pp_dir).predict_semantic(image_of_aspect(33, 301)).labels.shape == (33, 301)
    profile = se.semantic_profile(128, True, max_side=512)["image"]
    with pytest.raises(ExportError, match=r"input image shape \[600, 300, 3\] is outside the engine profile"):
        check_shapes_fit({"image": profile}, {"image": (600, 300, 3)}, "semantic.engine")
    assert se.semantic_profile(128, False) == {}


def test_volume_prediction_is_slice_by_slice_on_the_same_grid(unetr):
    model, _, out, _ = unetr
    vol = np.random.default_rng(3).normal(100, 20, (30, 40, 5)).astype(np.float32)
    p = Predictor.from_onnx(out)
    for axis in (0, 2):
        labels = p.predict_semantic_volume(vol, axis=axis)
        assert labels.shape == vol.shape and labels.dtype == np.uint8
        k = vol.shape[axis] // 2
        want = p.predict_semantic(np.take(vol, k, axis=axis)).labels
        np.testing.assert_array_equal(np.take(labels, k, axis=axis), want)
    with pytest.raises(DataError, match="axis: expected 0, 1 or 2"):
        p.predict_semantic_volume(vol, axis=3)
    with pytest.raises(DataError, match="not a 3D volume"):
        p.predict_semantic_volume(vol[..., 0], axis=2)


def test_build_without_tensorrt_is_a_clear_error(unetr, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT installed: the error path is not reachable")
    except ImportError:
        pass
    from medico_peft.export.tensorrt_build import build_engines

    _, _, out, _ = unetr
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        build_engines(out, tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU; none here")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_semantic_engine_builds_passes_its_gate_and_predicts(unetr, samed_pp, tmp_path, precision):
    pytest.importorskip("tensorrt", reason="tensorrt not installed (pip install tensorrt); engines also need a CUDA GPU")
    from medico_peft.export.tensorrt_build import build_engines

    for name, folder in (("unetr", unetr[2]), ("samed_pp", samed_pp[1])):
        meta = build_engines(folder, tmp_path / name, precision=precision)
        assert meta["task"] == "semantic" and list(meta["engines"]) == ["semantic"]
        assert meta["parity"]["max"]["label_mismatch"] <= se.TRT_TOLERANCES[precision].label_mismatch
        img = image_of_aspect(90, 140)
        a = Predictor.from_tensorrt(tmp_path / name).predict_semantic(img)
        b = Predictor.from_onnx(folder).predict_semantic(img)
        assert a.labels.shape == (90, 140) and (a.labels != b.labels).mean() < 0.02


@pytest.mark.slow
def test_gpu_check_semantic_dry_run_reports_skips_with_their_reason(tmp_path):
    """benchmarks/gpu_check.py's semantic section runs on CPU (no TensorRT rows built, each skip says why)."""
    from benchmarks.gpu_check import check_semantic, semantic_table

    rows = check_semantic("vit_tiny", "cpu", 1, tmp_path, ["fp32"])
    by = {r["backend"]: r for r in rows}
    assert by["torch fp32 (cpu)"]["max_logit_err"] == 0.0
    assert by["onnxruntime CPU"]["max_logit_err"] < 1e-3 and by["onnxruntime CPU"]["label_mismatch"] < 1e-3
    assert "CUDA GPU" in by["tensorrt fp32"]["skipped"]
    assert "| vit_tiny | tensorrt fp32 | skipped:" in semantic_table(rows)


def test_semantic_engine_sidecar_reads_back_and_the_interactive_engine_backend_refuses_it(samed_pp, tmp_path):
    """The TensorRT side that runs without a GPU: engine.json of a semantic export is typed as semantic (one
    `semantic.engine`, its classes and profile), and the interactive TensorRT backend refuses it by task."""
    from medico_peft.runtime.artifacts import read_engine_export, read_onnx_export, write_sidecar
    from medico_peft.runtime.trt_backend import TrtBackend

    _, folder, _ = samed_pp
    onnx_meta = read_onnx_export(folder).meta
    device = {"tensorrt_version": "10.9.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    profiles = {"semantic": se.semantic_profile(128, True)}
    write_sidecar(tmp_path / "engine.json", se.semantic_engine_sidecar(onnx_meta, device, "fp16", profiles,
                                                                       {"semantic": {}}, 4.0))
    art = read_engine_export(tmp_path)
    assert art.task == "semantic" and art.parts == ("semantic",) and art.with_preprocess
    assert art.part_path("semantic") == tmp_path / "semantic.engine"
    assert art.semantic["class_names"] == list(CLASSES) and art.profiles == profiles
    with pytest.raises(ExportError, match="semantic export .*predict_semantic"):
        TrtBackend(tmp_path)
