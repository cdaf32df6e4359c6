"""`medico-peft predict --semantic`: a label PNG for 2D input, a NIfTI label volume on the input's grid for 3D
input (checked with nibabel), on the torch and onnxruntime backends; wrong-task and prompt refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from _semantic_helpers import CLASSES, image_of_aspect, save_tiny_adapter, tiny_semantic  # noqa: E402
from medico_peft.cli import main  # noqa: E402
from medico_peft.runtime import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(unmerged model, adapter file, semantic ONNX folder made from it by the CLI, a NIfTI volume)."""
    root = tmp_path_factory.mktemp("predsem")
    model = tiny_semantic("samed", seed=3)
    adapter = save_tiny_adapter(model, root / "sem.safetensors")
    assert main(["export", "onnx", "--semantic", "--model", "vit_tiny", "--adapter", str(adapter), "--out",
                 str(root / "onnx"), "--parity-images", "2", "--real-images", "0"]) == 0
    vol = np.random.default_rng(0).normal(300, 80, (36, 44, 5)).astype(np.int16)
    affine = np.array([[-0.9, 0, 0, 40], [0, 1.1, 0.1, -20], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_slope_inter(0.5, 10.0)  # stored int16 with scaling: the label file must drop it
    nib.save(img, str(root / "scan.nii.gz"))
    return model, adapter, root / "onnx", root / "scan.nii.gz"


def test_2d_png_gives_a_label_png_equal_to_the_predictor(setup, tmp_path, capsys):
    model, _, onnx_dir, _ = setup
    img = image_of_aspect(70, 110)
    Image.fromarray(img).save(tmp_path / "x.png")
    out = tmp_path / "pred"
    assert main(["predict", "--semantic", "--backend", "onnxruntime", "--onnx", str(onnx_dir), "--image",
                 str(tmp_path / "x.png"), "--out", str(out)]) == 0
    assert "labels.png" in capsys.readouterr().out
    labels = np.asarray(Image.open(out / "labels.png"))
    want = Predictor.from_onnx(onnx_dir).predict_semantic(img).labels
    np.testing.assert_array_equal(labels, want)
    assert labels.shape == (70, 110) and labels.dtype == np.uint8
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == {str(i): n for i, n in enumerate(CLASSES)}
    assert (out / "labels_overlay.png").stat().st_size > 0
    np.testing.assert_array_equal(Predictor.from_torch(model).predict_semantic(img).labels, labels)


@pytest.mark.parametrize("axis", [2, 0])
def test_nifti_volume_gives_a_label_volume_on_the_same_grid(setup, tmp_path, axis):
    model, adapter, onnx_dir, scan = setup
    out = tmp_path / "vol"
    assert main(["predict", "--semantic", "--model", "vit_tiny", "--adapter", str(adapter), "--image", str(scan),
                 "--axis", str(axis), "--out", str(out)]) == 0
    src, lab = nib.load(str(scan)), nib.load(str(out / "labels.nii.gz"))
    assert lab.shape == src.shape
    np.testing.assert_array_equal(lab.affine, src.affine)
    np.testing.assert_array_equal(lab.header.get_qform(), src.header.get_qform())
    np.testing.assert_array_equal(lab.header.get_sform(), src.header.get_sform())
    assert int(lab.header["qform_code"]) == 1 and int(lab.header["sform_code"]) == 2
    assert lab.header.get_zooms() == src.header.get_zooms() and lab.header.get_xyzt_units() == ("mm", "sec")
    assert lab.get_data_dtype() == np.uint8 and lab.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    # independent reference: the scaled intensities, sliced by hand, one Predictor call per slice
    data = np.asarray(src.dataobj)
    p = Predictor.from_torch(model)
    for k in range(data.shape[axis]):
        want = p.predict_semantic(np.take(data, k, axis=axis)).labels
        np.testing.assert_array_equal(np.take(labels, k, axis=axis), want)
    meta = json.loads((out / "classes.json").read_text())
    assert meta["axis"] == axis and meta["shape"] == list(src.shape)


def test_onnx_volume_equals_torch_volume(setup, tmp_path):
    _, adapter, onnx_dir, scan = setup
    for backend, extra in (("torch", ["--model", "vit_tiny", "--adapter", str(adapter)]),
                           ("onnxruntime", ["--onnx", str(onnx_dir)])):
        assert main(["predict", "--semantic", "--backend", backend, *extra, "--image", str(scan),
                     "--out", str(tmp_path / backend)]) == 0
    a = np.asarray(nib.load(str(tmp_path / "torch" / "labels.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "onnxruntime" / "labels.nii.gz")).dataobj)
    assert (a != b).mean() <= 1e-3


def test_one_slice_of_a_volume_gives_a_png(setup, tmp_path):
    _, _, onnx_dir, scan = setup
    out = tmp_path / "one"
    assert main(["predict", "--semantic", "--backend", "onnxruntime", "--onnx", str(onnx_dir), "--image", str(scan),
                 "--slice", "2", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "labels.png")).shape == (36, 44)
    assert json.loads((out / "classes.json").read_text())["slice"] == 2


def test_wrong_task_and_prompts_are_refused_and_nothing_is_written(setup, tmp_path, capsys):
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.models import load_model

    _, adapter, onnx_dir, scan = setup
    inter = tmp_path / "inter"
    export_onnx(load_model("vit_tiny"), inter, parity_random=1, parity_real=0)
    img = tmp_path / "x.png"
    Image.fromarray(image_of_aspect(40, 60)).save(img)
    cases = [
        (["--semantic", "--backend", "onnxruntime", "--onnx", str(inter)], "interactive model .* no class head"),
        (["--backend", "onnxruntime", "--onnx", str(onnx_dir), "--box", "1", "1", "20", "20"],
         r"semantic model .*predict --semantic"),
        (["--semantic", "--backend", "onnxruntime", "--onnx", str(onnx_dir), "--box", "1", "1", "20", "20"],
         "--semantic takes no prompts"),
        (["--semantic", "--model", "vit_tiny"], "--adapter: predict --semantic on the torch backend needs"),
        (["--model", "vit_tiny", "--adapter", str(adapter), "--box", "1", "1", "20", "20"],
         "semantic adapter .* cannot be used for interactive"),
    ]
    import re

    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        assert main(["predict", *args, "--image", str(img), "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert re.search(message, err), (args, err)
        assert not out.exists() or not any(out.iterdir())
