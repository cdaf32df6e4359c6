"""The parity gate fails on what users would get: NaN/Inf anywhere, a wrong full-resolution graph output,
real images asked for but unavailable; and the Predictor returns exactly what the gate compared."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is the `export` extra")

from medico_peft.errors import ExportError  # noqa: E402
from medico_peft.export import wrappers  # noqa: E402
from medico_peft.export.onnx_export import export_onnx  # noqa: E402
from medico_peft.export.parity import test_images as gate_images  # noqa: E402
from medico_peft.export.parity import Tolerance, gate, real_images, run_parity  # noqa: E402
from medico_peft.models import load_model  # noqa: E402
from medico_peft.runtime import Predictor  # noqa: E402
from medico_peft.runtime.ort_backend import OrtBackend  # noqa: E402
from medico_peft.runtime.preprocess import _as_float, resized_hw, upscale_masks  # noqa: E402
from medico_peft.runtime.torch_backend import TorchBackend  # noqa: E402

FAST = dict(parity_random=1, parity_real=0)


@pytest.fixture(scope="module")
def tiny():
    return load_model("vit_tiny").eval()


class Poisoned:
    """A backend returning `value` in one output of the decoder for the 5-point prompt only (not the first row)."""

    def __init__(self, inner, value, where="iou"):
        self.inner, self.value, self.where = inner, value, where
        self.img_size, self.embedding_size = inner.img_size, inner.embedding_size

    def encode(self, image):
        return self.inner.encode(image)

    def decode(self, emb, coords, labels, *rest):
        low, iou = self.inner.decode(emb, coords, labels, *rest)
        if np.asarray(coords).shape[1] == 6:  # "5 points" + the padding point
            low, iou = low.clone(), iou.clone()
            (iou if self.where == "iou" else low).view(-1)[0] = self.value
        return low, iou


@pytest.mark.parametrize("value, where", [(float("nan"), "iou"), (float("nan"), "low"), (float("inf"), "iou"),
                                          (float("-inf"), "low")])
def test_nan_or_inf_in_one_case_fails_the_gate(tiny, value, where):
    rows = run_parity(tiny, Poisoned(TorchBackend(tiny), value, where), n_random=1, n_real=0)
    assert rows[0]["prompt"] == "1 point"  # the poisoned rows are not first (max() keeps a NaN only when first)
    with pytest.raises(ExportError, match=r"NaN/Inf values in the compared outputs \(image 'random 1:1.*'5 points'"):
        gate(rows, Tolerance(), "test")


def test_gate_ranks_a_nan_error_as_the_worst_even_without_the_nonfinite_count():
    rows = [{"image": "a", "prompt": "p", "multimask": False, "embeddings": 0.0, "low_res_logits": 0.0,
             "logits": e, "iou": 0.0, "end_to_end_logits": 0.0, "mask_mismatch": 0.0} for e in (0.0, float("nan"))]
    with pytest.raises(ExportError, match="logits max error nan"):
        gate(rows, Tolerance(), "test")


def test_onnx_export_with_nan_on_one_case_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    for method in ("decode", "decode_full"):
        original = getattr(OrtBackend, method, None)
        if original is None:
            continue

        def poisoned(self, emb, coords, *rest, _original=original):
            out = [t.clone() for t in _original(self, emb, coords, *rest)]
            if np.asarray(coords).shape[1] == 6:
                out[-1].view(-1)[0] = float("nan")  # iou is the last output of decode and decode_full
            return tuple(out)

        monkeypatch.setattr(OrtBackend, method, poisoned)
    out = tmp_path / "nan"
    with pytest.raises(ExportError, match="parity gate failed"):
        export_onnx(load_model("vit_tiny"), out, **FAST)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def _crop_off_by_rows(rows: int):
    def upscale(low, orig_hw, img_size):  # upscale_masks with the crop `rows` rows short, then resized back
        x = torch.nn.functional.interpolate(low, size=(img_size, img_size), mode="bilinear", align_corners=False)
        h, w = _as_float(orig_hw[0]), _as_float(orig_hw[1])
        nh, nw = resized_hw(h, w, img_size)
        x = x[..., : nh.to(torch.int64) - rows, : nw.to(torch.int64)]
        return torch.nn.functional.interpolate(x, size=(h.to(torch.int64), w.to(torch.int64)), mode="bilinear",
                                               align_corners=False)
    return upscale


def test_graph_with_a_wrong_full_resolution_crop_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(wrappers, "upscale_masks", _crop_off_by_rows(6))
    out = tmp_path / "badcrop"
    with pytest.raises(ExportError, match=r"parity gate failed: logits max error"):
        export_onnx(load_model("vit_tiny"), out, **FAST)
    assert not out.exists()


def test_predictor_on_onnx_returns_the_graph_output_the_gate_compared(tmp_path, monkeypatch):
    """Export a decoder whose crop is wrong with the logit tolerances opened: the gate's end-to-end error
    for the box prompt equals the Predictor's (onnxruntime vs torch), and the Predictor's logits are the
    graph's own `masks` output, not a torch upscale of the low-res logits."""
    monkeypatch.setattr(wrappers, "upscale_masks", _crop_off_by_rows(6))
    out = tmp_path / "open"
    loose = Tolerance(logits_atol=1e9, end_to_end_atol=1e9, mask_mismatch=1.0)
    meta = export_onnx(load_model("vit_tiny"), out, tolerance=loose, **FAST)
    monkeypatch.undo()
    (name, image), = gate_images(1, 0)
    h, w = image.shape[:2]
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.8 * h], np.float32)  # the gate's "box" case
    onnx = Predictor.from_onnx(out).set_image(image).predict(box=box)
    ref = Predictor.from_torch(load_model("vit_tiny")).set_image(image).predict(box=box)
    row, = [r for r in meta["parity"]["rows"] if r["image"] == name and r["prompt"] == "box" and not r["multimask"]]
    assert row["end_to_end_logits"] > 1e-2  # the wrong crop was measured ...
    assert np.abs(onnx.logits - ref.logits).max() == pytest.approx(row["end_to_end_logits"], rel=1e-5)  # ... as served
    upscaled = upscale_masks(torch.from_numpy(onnx.low_res_logits)[None], torch.tensor([h, w], dtype=torch.float32),
                             128)[0].numpy()  # vit_tiny: S = 128
    assert np.abs(onnx.logits - upscaled).max() > 1e-2  # not the torch upscale of its own low-res logits


def test_real_images_asked_for_but_nilearn_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)  # `from nilearn.datasets import ...` → ImportError
    assert real_images(0) == []
    with pytest.raises(ExportError, match=r"1 real image\(s\) asked for .*nilearn.*--real-images 0"):
        real_images(1)
    out = tmp_path / "noreal"
    with pytest.raises(ExportError, match="nilearn"):
        export_onnx(load_model("vit_tiny"), out, parity_random=1, parity_real=1)
    assert not out.exists()
