"""Device-resident backends (issue 13, item 4), checked on the CPU.

* onnxruntime IO binding: the encoder writes embeddings into a torch tensor and the decoder reads them
  by address; the CPU provider runs the same code, compared with plain `session.run`.
* A batch dimension in the exported encoder (`max_batch`), its parity row, and the option checks.
* The TensorRT backend's code path over stand-in engines: a fake TensorRT engine/context that reads its
  inputs from the bound addresses and writes its outputs to the bound addresses (running the ONNX
  graphs underneath), so `TrtBackend` + `Predictor` run end to end on the CPU, embeddings are bound in
  place (no copy), and a refused `set_input_shape` is reported instead of ignored.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medico_peft.errors import ExportError
from medico_peft.export.onnx_export import export_onnx
from medico_peft.export.tensorrt_build import decoder_profile, encoder_profile
from medico_peft.models import load_model
from medico_peft.runtime import Predictor
from medico_peft.runtime.artifacts import read_onnx_export
from medico_peft.runtime.ort_backend import OrtBackend
from medico_peft.runtime.trt_backend import TrtBackend, TrtEngine


@pytest.fixture(scope="module")
def batched_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("batched") / "onnx"
    meta = export_onnx(load_model("vit_tiny"), out, parity_random=1, parity_real=0, max_batch=2)
    return out, meta


def _image(seed=0, shape=(48, 64)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_batched_export_records_max_batch_and_gates_a_batch(batched_export):
    out, meta = batched_export
    assert meta["max_batch"] == 2 and read_onnx_export(out).max_batch == 2
    batch_rows = [r for r in meta["parity"]["rows"] if r["prompt"] == "encoder only"]
    assert len(batch_rows) == 1 and batch_rows[0]["embeddings"] <= 1e-3


def test_encode_batch_equals_one_by_one(batched_export):
    backend = OrtBackend(batched_export[0])
    images = [_image(1), _image(2, (64, 40)), _image(3)]
    batched = backend.encode_batch(images)
    single = torch.cat([backend.encode(im) for im in images])
    assert batched.shape == single.shape and batched.shape[0] == 3
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch": 0}, "--max-batch: expected an integer >= 1"),
    ({"max_batch": 2, "with_preprocess": True}, "needs an export without --with-preprocess"),
])
def test_bad_max_batch_is_refused_and_nothing_written(tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export_onnx(load_model("vit_tiny"), tmp_path / "x", parity_random=1, parity_real=0, **kwargs)
    assert not (tmp_path / "x").exists()


class _SpyBinding:
    """Wraps an onnxruntime IOBinding and records the addresses bound to each input."""

    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def bind_input(self, name, dev_type, dev_id, dtype, shape, ptr):
        self._log[name] = ptr
        return self._inner.bind_input(name, dev_type, dev_id, dtype, shape, ptr)

    def __getattr__(self, item):
        return getattr(self._inner, item)


def test_ort_io_binding_equals_plain_run_and_binds_embeddings_in_place(batched_export):
    plain = Predictor(OrtBackend(batched_export[0], io_binding=False))
    bound_backend = OrtBackend(batched_export[0], io_binding=True)
    bound = Predictor(bound_backend)
    sess = bound_backend.sessions["decoder"]
    log = {}
    bound_backend.sessions["decoder"] = SimpleNamespace(io_binding=lambda: _SpyBinding(sess.io_binding(), log),
                                                        run_with_iobinding=sess.run_with_iobinding)
    img = _image(4)
    for p in (plain, bound):
        p.set_image(img)
    emb = bound._embeddings
    assert isinstance(emb, torch.Tensor)
    for prompt in ({"box": [5, 6, 40, 30]}, {"points": [[20, 20], [30, 10]], "labels": [1, 0]}):
        a, b = plain.predict(**prompt), bound.predict(**prompt)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert log["image_embeddings"] == emb.data_ptr()  # read from the encoder's tensor, not a copy


# ---------------------------------------------------------------------------------------------------------
# A stand-in for TensorRT's engine/context API that executes ONNX graphs through addresses.

_NAMES = SimpleNamespace(INPUT=SimpleNamespace(name="INPUT"), OUTPUT=SimpleNamespace(name="OUTPUT"),
                         FLOAT=SimpleNamespace(name="FLOAT"))


def _read(ptr, shape):
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape).copy()


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.refuse = engine, {}, {}, set()
        self.address_log = []

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile.get(name, (shape, shape, shape))
        if name in self.refuse or len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        self.address_log.append((name, ptr))
        return True

    def _inputs(self):
        return {n: _read(self.addresses[n], self.shapes[n]) for n in self.engine.inputs}

    def infer_shapes(self):
        missing = [n for n in self.engine.inputs if n not in self.shapes]
        if missing:
            return missing
        self._out = dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, self._inputs())))
        return []

    def get_tensor_shape(self, name):
        return self._out[name].shape

    def execute_async_v3(self, stream):
        outs = self.engine.session.run(self.engine.outputs, self._inputs())
        for name, value in zip(self.engine.outputs, outs):
            value = np.ascontiguousarray(value, np.float32)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class _FakeEngine:
    def __init__(self, session, outputs, profile):
        self.session, self.profile = session, profile
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = outputs
        self.num_io_tensors = len(self.inputs) + len(outputs)
        self.last_context = None

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return _NAMES.INPUT if name in self.inputs else _NAMES.OUTPUT

    def get_tensor_dtype(self, name):
        return _NAMES.FLOAT

    def create_execution_context(self):
        self.last_context = _FakeContext(self)
        return self.last_context


def _fake_trt_backend(folder, max_points=8):
    ort_backend = OrtBackend(folder)
    art = ort_backend.artifact
    profiles = {"encoder": encoder_profile(art.img_size, art.with_preprocess, max_batch=art.max_batch),
                "decoder": decoder_profile(max_points)}
    engines = {
        "encoder": TrtEngine(_FakeEngine(ort_backend.sessions["encoder"], ["image_embeddings"], profiles["encoder"]),
                             "encoder.engine", device="cpu"),
        "decoder": TrtEngine(_FakeEngine(ort_backend.sessions["decoder"], ["low_res_masks", "iou_predictions"],
                                         profiles["decoder"]), "decoder.engine", device="cpu"),
    }
    backend = TrtBackend.__new__(TrtBackend)
    backend._adopt(art)
    backend.profiles = profiles
    backend._setup(engines, cuda_graph=False)
    return backend


def test_trt_backend_code_path_matches_onnxruntime_and_keeps_embeddings_in_place(batched_export):
    trt = _fake_trt_backend(batched_export[0])
    ort = Predictor(OrtBackend(batched_export[0]))
    pred = Predictor(trt)
    img = _image(5)
    ort.set_image(img)
    pred.set_image(img)
    emb = pred._embeddings
    first = ort.predict(box=[4, 4, 50, 40])
    for prompt in ({"box": [4, 4, 50, 40]},
                   {"points": [[10, 12]], "labels": [1], "mask_input": first.low_res_logits[0]}):
        a, b = ort.predict(**prompt), pred.predict(**prompt)
        # the ONNX decoder returns the graph's own full-resolution masks, the engine path upscales low-res
        # logits with the shared upscaler: the parity gate's tolerance applies
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
        assert np.abs(a.logits - b.logits).max() <= 1e-3
        dec_ctx = trt.engines["decoder"].context
        bound = dict(dec_ctx.address_log[-len(dec_ctx.engine.inputs) - 2:])
        assert bound["image_embeddings"] == emb.data_ptr()  # bound in place: no host round trip
    batch = trt.encode_batch([_image(6), _image(7), _image(8)])
    single = torch.cat([trt.encode(im) for im in (_image(6), _image(7), _image(8))])
    assert batch.shape[0] == 3 and torch.allclose(batch, single, atol=1e-5)


def test_trt_engine_reports_a_refused_input_shape(batched_export):
    trt = _fake_trt_backend(batched_export[0])
    engine = trt.engines["decoder"]
    engine.context.refuse.add("point_coords")
    coords = np.zeros((1, 2, 2), np.float32)
    feed = {"image_embeddings": torch.zeros(1, 1), "point_coords": coords, "point_labels": np.zeros((1, 2)),
            "mask_input": np.zeros((1, 1, 4, 4)), "has_mask_input": np.zeros(1), "orig_im_size": np.ones(2)}
    with pytest.raises(ExportError, match=r"decoder.engine: TensorRT refused input .* of shape"):
        engine.run(feed)


def test_trt_engine_reports_unresolved_shapes(batched_export):
    trt = _fake_trt_backend(batched_export[0])
    engine = trt.engines["encoder"]
    engine.context.infer_shapes = lambda: ["image_embeddings"]
    with pytest.raises(ExportError, match="could not infer the shapes of"):
        engine.run({"image": np.zeros((1, 3, trt.img_size, trt.img_size), np.float32)})


def test_cuda_graphs_need_a_cuda_device(batched_export):
    trt = _fake_trt_backend(batched_export[0])
    trt.cuda_graph = True
    Predictor(trt).set_image(_image(9))
    with pytest.raises(ExportError, match="CUDA graphs need a CUDA device"):
        trt.decode(torch.zeros(1, 1), np.zeros((1, 2, 2), np.float32), np.ones((1, 2), np.float32), None, 0.0,
                   (48, 64), False)
