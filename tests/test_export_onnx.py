"""ONNX export: parity gate over aspect ratios and prompts, sidecar, adapters fused, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from medico_peft.errors import AdapterError, ExportError  # noqa: E402
from medico_peft.export.onnx_export import export_onnx  # noqa: E402
from medico_peft.export.parity import ASPECTS, Tolerance  # noqa: E402
from medico_peft.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "onnx"
    meta = export_onnx(load_model("vit_tiny"), out, parity_real=1)
    return out, meta


def test_export_writes_graphs_and_sidecar_with_parity_table(tiny_export):
    out, meta = tiny_export
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "export.json"]
    side = json.loads((out / "export.json").read_text())
    assert side["opset"] >= 17 and side["model"]["spec"]["name"] == "vit_tiny" and len(side["model"]["base_sha256"]) == 64
    dec_in = {i["name"]: i for i in side["io"]["decoder"]["inputs"]}
    assert dec_in["point_coords"]["shape"] == [1, "num_points", 2]
    assert dec_in["orig_im_size"] == {"name": "orig_im_size", "shape": [2], "dtype": "float32"}
    rows = side["parity"]["rows"]
    images = {r["image"] for r in rows}
    assert all(any(a in i for i in images) for a in ASPECTS)  # 1:1, 3:4, 16:9, tall
    assert {r["prompt"] for r in rows} == {"1 point", "2 points", "5 points", "box", "box+point", "box+mask"}
    assert {r["multimask"] for r in rows} == {False, True}
    assert side["parity"]["max"]["logits"] < 1e-3 and side["parity"]["max"]["mask_mismatch"] < 1e-3


def test_decoder_masks_follow_orig_im_size_for_every_aspect_ratio(tiny_export):
    """orig_im_size is an input: no size is baked in at trace time (SAM's SamOnnxModel bug)."""
    import onnxruntime as ort

    out, _ = tiny_export
    model = load_model("vit_tiny")
    sess = ort.InferenceSession(str(out / "decoder.onnx"))
    emb = torch.randn(1, 32, 8, 8)
    for h, w in [(128, 128), (300, 400), (90, 160), (400, 100), (37, 251)]:
        feed = {"image_embeddings": emb.numpy(), "point_coords": np.array([[[w / 3, h / 2], [0, 0]]], np.float32),
                "point_labels": np.array([[1, -1]], np.float32), "mask_input": np.zeros((1, 1, 32, 32), np.float32),
                "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([h, w], np.float32)}
        masks, iou, low = sess.run(None, feed)
        assert masks.shape == (1, 4, h, w) and low.shape == (1, 4, 32, 32)
        scale = 128 / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        ref = model.upscale_logits(torch.from_numpy(low), (nh, nw), (h, w))
        np.testing.assert_allclose(masks, ref.numpy(), atol=1e-4)


def test_parity_gate_failure_writes_nothing(tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match=r"parity gate failed: embeddings max error .* \(image 'random 1:1"):
        export_onnx(load_model("vit_tiny"), out, tolerance=Tolerance(embeddings_atol=1e-12), parity_random=1,
                    parity_real=0)
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_with_preprocess_float_input_simplified_and_external_data(tmp_path):
    from medico_peft.runtime import Predictor

    meta = export_onnx(load_model("vit_tiny"), tmp_path / "pp", with_preprocess=True, input_dtype="float32",
                       simplify=True, external_data=True, parity_random=2, parity_real=1)
    assert meta["io"]["encoder"]["inputs"][0] == {"name": "image", "shape": ["height", "width", 3], "dtype": "float32"}
    assert (tmp_path / "pp" / "encoder.onnx.data").stat().st_size > 100_000
    assert meta["simplified"] and meta["parity"]["max"]["embeddings"] < 1e-3
    img = np.random.default_rng(0).normal(100, 30, (70, 180)).astype(np.float32)
    a = Predictor.from_onnx(tmp_path / "pp").set_image(img).predict(box=[10, 5, 120, 60])
    b = Predictor.from_torch(load_model("vit_tiny")).set_image(img).predict(box=[10, 5, 120, 60])
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)


def test_opset_below_17_refused(tmp_path):
    with pytest.raises(ExportError, match="expected >= 17"):
        export_onnx(load_model("vit_tiny"), tmp_path / "x", opset=13)


def _adapter_file(tmp_path, method, base):
    from medico_peft.adapters import save_adapter
    from medico_peft.tuners import PeftConfig, inject

    model = inject(base, PeftConfig(method=method, rank=4, targets=("q", "v"), bottleneck=8))
    with torch.no_grad():  # non-trivial adapters: up-projections are zero at init
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or ".up." in name):
                p.normal_(0, 0.05)
    return save_adapter(model, tmp_path / f"{method}.safetensors")


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_export_with_adapter_fused_passes_gate_and_changes_outputs(tmp_path, tiny_export, method):
    pytest.importorskip("peft")
    from medico_peft.cli import main
    from medico_peft.runtime import Predictor
    from medico_peft.utils.hashing import sha256_file

    path = _adapter_file(tmp_path, method, load_model("vit_tiny"))
    out = tmp_path / f"onnx_{method}"
    assert main(["export", "onnx", "--model", "vit_tiny", "--adapter", str(path), "--out", str(out),
                 "--parity-images", "2", "--real-images", "0"]) == 0
    side = json.loads((out / "export.json").read_text())
    assert side["adapter"]["sha256"] == sha256_file(path)
    assert side["fuse"]["method"] == method and side["fuse"]["fuse_max_abs_error"] < 1e-4
    assert side["model"]["base_sha256"] == load_model("vit_tiny").base_sha256
    img = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    tuned = Predictor.from_onnx(out).set_image(img).predict(box=[10, 10, 100, 80]).logits
    base = Predictor.from_onnx(tiny_export[0]).set_image(img).predict(box=[10, 10, 100, 80]).logits
    assert np.abs(tuned - base).max() > 1e-3  # the adapter is really in the graph


def test_adapter_for_another_base_is_refused(tmp_path):
    pytest.importorskip("peft")
    from medico_peft.export.fuse import fuse
    from medico_peft.models import build_model
    from medico_peft.utils.hashing import sha256_state_dict

    other = build_model("vit_tiny", seed=1)
    other.base_sha256 = sha256_state_dict(other.state_dict())
    path = _adapter_file(tmp_path, "lora", other)
    with pytest.raises(AdapterError):
        fuse(load_model("vit_tiny"), path)


@pytest.mark.slow
def test_litemedsam_real_weights_export_and_predictor_parity(tmp_path):
    from medico_peft.export.parity import real_images
    from medico_peft.runtime import Predictor

    model = load_model("litemedsam")
    meta = export_onnx(model, tmp_path / "lite", parity_random=2, parity_real=1, threads=1)
    assert meta["parity"]["max"]["end_to_end_logits"] < 1e-2
    images = real_images(1)
    if not images:
        pytest.skip("nilearn MNI152 template unavailable")
    img = images[0][1]
    h, w = img.shape
    box = [0.3 * w, 0.3 * h, 0.7 * w, 0.75 * h]
    a = Predictor.from_torch(model).set_image(img).predict(box=box)
    b = Predictor.from_onnx(tmp_path / "lite", threads=1).set_image(img).predict(box=box)
    assert a.masks.shape == (1, h, w) and a.masks.any()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)
    assert (a.masks != b.masks).mean() < 1e-3


@pytest.mark.slow  # ~1.5 min on 2 cores: runs in CI, skip locally with -m "not slow"
def test_vit_b_export_passes_gate(tmp_path):
    meta = export_onnx(load_model("vit_b"), tmp_path / "vitb", parity_random=1, parity_real=0, threads=2)
    assert meta["io"]["encoder"]["inputs"][0]["shape"] == [1, 3, 1024, 1024]
    assert meta["files"]["encoder"]["bytes"] > 300e6
