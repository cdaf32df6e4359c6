"""One predictor, two backends (torch, onnxruntime): same call, same results; embedding cache; bad inputs; CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from medico_peft.errors import DataError, ExportError  # noqa: E402
from medico_peft.export.onnx_export import export_onnx  # noqa: E402
from medico_peft.models import load_model  # noqa: E402
from medico_peft.runtime import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "onnx"
    export_onnx(load_model("vit_tiny"), out, parity_random=1, parity_real=0)
    return out


@pytest.fixture(scope="module")
def predictors(onnx_dir):
    return Predictor.from_torch(load_model("vit_tiny")), Predictor.from_onnx(onnx_dir)


IMAGES = {"uint8 gray 3:4": np.random.default_rng(0).integers(0, 255, (150, 200), dtype=np.uint8),
          "uint8 rgb tall": np.random.default_rng(1).integers(0, 255, (300, 80, 3), dtype=np.uint8),
          "float16-bit CT-like": np.random.default_rng(2).normal(40, 300, (64, 112, 1)).astype(np.float32)}


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("prompt", [dict(box=[5, 6, 60, 50]), dict(points=[[20, 30]]),
                                    dict(points=[[20, 30], [50, 40]], labels=[1, 0], box=[5, 6, 60, 50])])
@pytest.mark.parametrize("multimask", [False, True])
def test_torch_and_onnxruntime_give_the_same_masks(predictors, name, prompt, multimask):
    image = IMAGES[name]
    outs = [p.set_image(image).predict(multimask=multimask, **prompt) for p in predictors]
    m = 3 if multimask else 1
    for out in outs:
        assert out.masks.shape == (m, *image.shape[:2]) and out.masks.dtype == bool
        assert out.scores.shape == (m,) and out.low_res_logits.shape == (m, 32, 32)
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, atol=1e-3)
    np.testing.assert_allclose(outs[0].scores, outs[1].scores, atol=1e-4)


def test_mask_input_refinement_round_trip(predictors):
    image = IMAGES["uint8 gray 3:4"]
    results = []
    for p in predictors:
        first = p.set_image(image).predict(box=[5, 6, 60, 50])
        results.append(p.predict(box=[5, 6, 60, 50], mask_input=first.low_res_logits[0]))
    assert not np.allclose(results[0].logits, predictors[0].predict(box=[5, 6, 60, 50]).logits)
    np.testing.assert_allclose(results[0].logits, results[1].logits, atol=1e-3)


def test_embeddings_are_cached_by_image_content(onnx_dir):
    p = Predictor.from_onnx(onnx_dir)
    calls = []
    encode = p.backend.encode
    p.backend.encode = lambda arr: calls.append(1) or encode(arr)
    img = IMAGES["uint8 rgb tall"]
    p.set_image(img)
    p.set_image(img.copy())
    assert len(calls) == 1
    p.set_image(img[::-1].copy())
    assert len(calls) == 2


@pytest.mark.parametrize("image,match", [
    (np.zeros((4, 5, 6, 7), np.uint8), "expected H×W, H×W×1 or H×W×3"),
    (np.zeros((20, 20, 4), np.uint8), "expected H×W, H×W×1 or H×W×3"),
    (np.zeros((20, 20), bool), "dtype bool not supported"),
    (np.full((20, 20), np.nan, np.float32), "NaN"),
])
def test_bad_images_are_clear_errors(predictors, image, match):
    with pytest.raises(DataError, match=match):
        predictors[1].set_image(image)


def test_bad_prompts_are_clear_errors(predictors):
    p = predictors[0].set_image(IMAGES["uint8 gray 3:4"])
    with pytest.raises(DataError, match=r"\[250.0, 10.0\] \(x, y\) lies outside the 200×150"):
        p.predict(points=[[250, 10]])
    with pytest.raises(DataError, match="no points and no box"):
        p.predict()
    with pytest.raises(DataError, match="box: expected x0 <= x1"):
        p.predict(box=[50, 10, 20, 40])
    with pytest.raises(DataError, match="expected 32×32 low-res logits"):
        p.predict(box=[5, 5, 40, 40], mask_input=np.zeros((64, 64)))


def test_onnx_from_another_model_is_refused(onnx_dir, tmp_path):
    other = tmp_path / "other"
    export_onnx(load_model("vit_tiny", img_size=64), other, parity_random=1, parity_real=0)
    mixed = tmp_path / "mixed"
    shutil.copytree(onnx_dir, mixed)
    shutil.copy(other / "decoder.onnx", mixed / "decoder.onnx")
    with pytest.raises(ExportError, match=r"decoder.onnx: inputs do not match.*expected image_embeddings "
                                          r"\(1, 32, 8, 8\).*found image_embeddings \(1, 32, 4, 4\)"):
        Predictor.from_onnx(mixed)


def test_predict_cli_png_and_nifti_on_both_backends(onnx_dir, tmp_path, capsys):
    import nibabel as nib
    from PIL import Image

    from medico_peft.cli import main

    png = tmp_path / "img.png"
    Image.fromarray(IMAGES["uint8 gray 3:4"]).save(png)
    vol = np.random.default_rng(0).normal(0, 100, (60, 80, 5)).astype(np.float32)
    nii = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(nii))
    for backend, src in (("torch", ["--model", "vit_tiny"]), ("onnxruntime", ["--onnx", str(onnx_dir)])):
        out = tmp_path / backend
        assert main(["predict", "--backend", backend, *src, "--image", str(png), "--box", "5", "6", "60", "50",
                     "--out", str(out)]) == 0
        mask = np.asarray(Image.open(out / "mask.png"))
        assert mask.shape == (150, 200) and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(out / "mask_overlay.png")).shape == (150, 200, 3)
        assert main(["predict", "--backend", backend, *src, "--image", str(nii), "--slice", "2", "--point", "10",
                     "20", "--neg-point", "40", "30", "--out", str(out / "nii")]) == 0
        assert np.asarray(Image.open(out / "nii" / "mask.png")).shape == (60, 80)
    assert main(["predict", "--model", "vit_tiny", "--image", str(nii), "--slice", "9", "--box", "1", "1", "9", "9",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--slice: 9 is outside the volume (5 slices along axis 2)" in capsys.readouterr().err
    assert main(["predict", "--model", "vit_tiny", "--image", str(png), "--out", str(tmp_path / "bad")]) == 2
    assert "no points and no box" in capsys.readouterr().err


@pytest.mark.parametrize("family, mode", [("tinyvit", "minmax"), ("vit", "div255")])
def test_gpu_check_preprocesses_like_the_model(family, mode):
    """benchmarks/gpu_check.py feeds the encoder the model's own preprocessing (LiteMedSAM: min-max), not div255."""
    from types import SimpleNamespace

    from benchmarks.gpu_check import encoder_input
    from medico_peft.runtime.preprocess import preprocess_image

    img = np.random.default_rng(0).integers(40, 120, (48, 64, 3), dtype=np.uint8)
    model = SimpleNamespace(img_size=64, spec=SimpleNamespace(family=family))
    x = encoder_input(model, img)
    assert torch.equal(x, preprocess_image(torch.from_numpy(img), 64, mode))
    assert float(x.max()) == pytest.approx(1.0 if mode == "minmax" else 119 / 255, abs=1e-2)
