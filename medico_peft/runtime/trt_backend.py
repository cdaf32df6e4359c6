"""TensorRT backend over the folder written by `medico-peft export tensorrt`.

Buffers are torch CUDA tensors (no pycuda): inputs get `set_input_shape` + `set_tensor_address`,
outputs are allocated at the shape the context reports, and `execute_async_v3` runs on torch's
current stream. The engine sidecar is checked against this GPU and TensorRT version first.

The decoder engine has no full-resolution `masks` output (`export.tensorrt_build` strips it), so
`full_res_output` is False: the Predictor — and the TensorRT parity gate, which compares exactly
what this backend returns — upscale the low-res logits with the shared `upscale_masks`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .artifacts import PARTS, SEMANTIC_PART, check_engine_compat, check_shapes_fit, current_device_info, \
    import_tensorrt, read_engine_export
from .ort_backend import decoder_feed
from .exported_backend import ExportedBackend

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "UINT8": torch.uint8, "BOOL": torch.bool}


class TrtEngine:
    def __init__(self, path: Path, runtime):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ExportError(f"{path}: TensorRT could not deserialize this engine (corrupt, or built elsewhere)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        import tensorrt as trt

        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]

    def __call__(self, feed: dict) -> dict:
        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            t = torch.as_tensor(np.ascontiguousarray(feed[name])).to("cuda", dtype).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            results[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        return {k: v.float().cpu() for k, v in results.items()}


class TrtBackend(ExportedBackend):
    name = "tensorrt"
    what = "engine"
    full_res_output = False  # the engine's decoder returns low-res logits only (see the module docstring)

    def __init__(self, folder: str | os.PathLike):
        self._adopt(read_engine_export(folder))
        trt = import_tensorrt()
        check_engine_compat(self.meta, current_device_info(), str(self.artifact.sidecar))
        self.profiles = self.artifact.profiles
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engines = {part: TrtEngine(self.artifact.part_path(part), runtime) for part in PARTS}

    def encode(self, image_hwc3: np.ndarray) -> torch.Tensor:
        feed = self.encoder_feed(image_hwc3)
        if self.with_preprocess:
            check_shapes_fit(self.profiles["encoder"], {"image": feed.shape}, "encoder.engine")
        return self.engines["encoder"]({"image": feed})["image_embeddings"]

    def decode(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        sl = self.mask_slice(multimask)
        feed = decoder_feed(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, self.embedding_size)
        check_shapes_fit(self.profiles["decoder"], {k: feed[k].shape for k in ("point_coords", "point_labels")},
                         "decoder.engine")
        out = self.engines["decoder"](feed)
        return out["low_res_masks"][:, sl], out["iou_predictions"][:, sl]


class TrtSemanticBackend(ExportedBackend):
    """A semantic engine (`semantic.engine` from a semantic ONNX export) on TensorRT.

    Inputs are checked against the ONNX graph's fixed dimensions and, for in-graph preprocessing, the
    engine's optimisation profile (image sides it was built for) before they run.
    """

    name = "tensorrt"
    what = "semantic engine"
    task = "semantic"

    def __init__(self, folder: str | os.PathLike):
        self._adopt(read_engine_export(folder))
        self.class_names = [str(n) for n in self.artifact.semantic["class_names"]]
        self.logits_at = self.artifact.semantic["logits_at"]
        trt = import_tensorrt()
        check_engine_compat(self.meta, current_device_info(), str(self.artifact.sidecar))
        self.profiles = self.artifact.profiles
        self.meta = {**self.meta, "io": self.meta["onnx"]["io"]}  # check_feed reads the graph's I/O
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = TrtEngine(self.artifact.part_path(SEMANTIC_PART), trt.Runtime(self._logger))

    def run_graph(self, feed: np.ndarray) -> torch.Tensor:
        self.check_feed(SEMANTIC_PART, "image", feed)
        if self.profiles.get(SEMANTIC_PART):
            check_shapes_fit(self.profiles[SEMANTIC_PART], {"image": feed.shape}, "semantic.engine")
        return self.engine({"image": feed})["logits"]

    def semantic_logits(self, image_hwc3: np.ndarray) -> torch.Tensor:
        from .semantic import logits_to_original

        logits = self.run_graph(self.encoder_feed(image_hwc3))
        if self.logits_at == "model":
            logits = logits_to_original(logits, image_hwc3.shape[:2], self.img_size)
        return logits
