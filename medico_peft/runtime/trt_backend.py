"""TensorRT backend over the folder written by `medico-peft export tensorrt`.

Device-resident: buffers are torch CUDA tensors (no pycuda). The encoder's embeddings stay on the GPU
(the Predictor caches the device tensor) and go straight into the decoder engine by address; prompt
inputs are copied once into device buffers; only the decoder's outputs — after the shared upscaler has
run on the GPU (`decode_at_original_size`) — come back to the host. Every `set_input_shape` and
`set_tensor_address` result is checked (TensorRT reports a shape outside the optimisation profile by
returning False, not by raising), and `infer_shapes` must leave no tensor unresolved before a run.

Batches: an engine whose optimisation profile allows a batch dimension > 1 (encoders exported without
in-graph preprocessing, `--max-batch`) encodes several slices per call (`encode_batch`); otherwise slices
go one by one through the same code.

CUDA graphs (`cuda_graph=True`): the decoder is captured once per input-shape key (number of points)
into a `torch.cuda.CUDAGraph` over static input/output buffers; later calls copy the prompts into the
static inputs and replay. TensorRT requires one ordinary `execute_async_v3` after a shape change before
capture, which `_capture` does. Replays share the execution context, so a backend is not thread-safe.

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
from .exported_backend import ExportedBackend

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "UINT8": torch.uint8, "BOOL": torch.bool}


def as_device_tensor(value, dtype: torch.dtype, device) -> torch.Tensor:
    """`value` (numpy array or tensor) as a contiguous tensor of `dtype` on `device`; a tensor already there
    in that dtype is returned as it is (no copy)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
    return t.to(device=device, dtype=dtype).contiguous()


def decoder_inputs(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, embedding_size: int,
                   device) -> dict[str, torch.Tensor]:
    """The decoder's inputs as float32 tensors on `device`; `embeddings` on that device is used in place."""
    side = 4 * embedding_size
    f32 = torch.float32
    if mask_input is None:
        mask = torch.zeros((1, 1, side, side), dtype=f32, device=device)
    else:
        mask = as_device_tensor(mask_input, f32, device).reshape(1, 1, side, side)
    return {
        "image_embeddings": as_device_tensor(embeddings, f32, device),
        "point_coords": as_device_tensor(np.asarray(coords, np.float32), f32, device),
        "point_labels": as_device_tensor(np.asarray(labels, np.float32), f32, device),
        "mask_input": mask,
        "has_mask_input": torch.full((1,), float(has_mask_input), dtype=f32, device=device),
        "orig_im_size": as_device_tensor(np.asarray(orig_hw, np.float32), f32, device),
    }


def _is_input(mode) -> bool:
    return getattr(mode, "name", str(mode)).upper().endswith("INPUT")


class TrtEngine:
    """One deserialized engine with its execution context; runs on device tensors and returns device tensors."""

    def __init__(self, engine, source: str, device="cuda"):
        self.engine = engine
        self.source = source
        self.device = torch.device(device)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ExportError(f"{source}: TensorRT could not create an execution context (out of GPU memory?)")
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if _is_input(engine.get_tensor_mode(n))]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._graphs: dict[tuple, tuple] = {}

    @classmethod
    def load(cls, path: Path, runtime, device="cuda") -> "TrtEngine":
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ExportError(f"{path}: TensorRT could not deserialize this engine (corrupt, or built elsewhere)")
        return cls(engine, str(path), device)

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _stream_handle(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _bind(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set shapes and addresses of `inputs` (device tensors of the engine's dtypes); allocate and bind the
        outputs at the shapes TensorRT infers. Every TensorRT status is checked."""
        for name in self.inputs:
            t = inputs[name]
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ExportError(f"{self.source}: TensorRT refused input {name} of shape {list(t.shape)} "
                                  "(outside the engine's optimisation profile)")
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise ExportError(f"{self.source}: TensorRT refused the address of input {name}")
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise ExportError(f"{self.source}: TensorRT could not infer the shapes of {list(unresolved)} from the "
                              f"input shapes { {n: list(inputs[n].shape) for n in self.inputs} }")
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ExportError(f"{self.source}: output {name} has unresolved shape {list(shape)}")
            outputs[name] = torch.empty(shape, dtype=self.dtype(name), device=self.device)
            if not self.context.set_tensor_address(name, outputs[name].data_ptr()):
                raise ExportError(f"{self.source}: TensorRT refused the address of output {name}")
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream_handle()):
            raise ExportError(f"{self.source}: TensorRT execution failed (see the TensorRT log)")

    def run(self, feed: dict) -> dict[str, torch.Tensor]:
        """Run on `feed` (tensors or arrays; device tensors of the right dtype are bound in place) and return
        the outputs as device tensors, ordered on torch's current stream (no host synchronisation here)."""
        inputs = {name: as_device_tensor(feed[name], self.dtype(name), self.device) for name in self.inputs}
        outputs = self._bind(inputs)
        self._execute()
        return outputs

    def run_graph(self, feed: dict) -> dict[str, torch.Tensor]:
        """Like `run`, through a CUDA graph captured once per input-shape key (static buffers, replay)."""
        inputs = {name: as_device_tensor(feed[name], self.dtype(name), self.device) for name in self.inputs}
        key = tuple((name, tuple(inputs[name].shape)) for name in self.inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self._graphs[key]
        for name, t in inputs.items():
            static_in[name].copy_(t)
        graph.replay()
        return {name: t.clone() for name, t in static_out.items()}

    def _capture(self, inputs: dict[str, torch.Tensor]):
        if self.device.type != "cuda":
            raise ExportError(f"{self.source}: CUDA graphs need a CUDA device, got {self.device}")
        static_in = {name: t.clone() for name, t in inputs.items()}
        static_out = self._bind(static_in)
        self._execute()  # TensorRT needs one ordinary run after a shape change before capture
        torch.cuda.current_stream(self.device).synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.graph(graph, stream=stream):
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"{self.source}: TensorRT execution failed during CUDA-graph capture")
        return graph, static_in, static_out


class TrtBackend(ExportedBackend):
    name = "tensorrt"
    what = "engine"
    full_res_output = False  # the engine's decoder returns low-res logits only (see the module docstring)

    def __init__(self, folder: str | os.PathLike, cuda_graph: bool = False, device="cuda"):
        self._adopt(read_engine_export(folder))
        trt = import_tensorrt()
        check_engine_compat(self.meta, current_device_info(), str(self.artifact.sidecar))
        self.profiles = self.artifact.profiles
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engines = {part: TrtEngine.load(self.artifact.part_path(part), runtime, device) for part in PARTS}
        self._setup(engines, cuda_graph)

    def _setup(self, engines: dict, cuda_graph: bool) -> None:
        """Everything after loading (separate so tests can run it over stand-in engines on the CPU)."""
        self.engines = engines
        self.device = engines["encoder"].device
        self.cuda_graph = bool(cuda_graph)

    @property
    def max_batch(self) -> int:
        """How many slices one encoder call takes (the profile's largest batch; 1 with in-graph preprocessing)."""
        profile = self.profiles.get("encoder", {}).get("image")
        if self.with_preprocess or not profile:
            return 1
        return int(profile[2][0])

    def encode(self, image_hwc3: np.ndarray) -> torch.Tensor:
        feed = self.encoder_feed(image_hwc3)
        if self.profiles.get("encoder"):
            check_shapes_fit(self.profiles["encoder"], {"image": feed.shape}, "encoder.engine")
        return self.engines["encoder"].run({"image": feed})["image_embeddings"]

    def encode_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, C, E, E) device embeddings of `images`, `max_batch` slices per engine call."""
        if self.max_batch <= 1:
            return torch.cat([self.encode(im) for im in images])
        out = []
        for i in range(0, len(images), self.max_batch):
            feed = np.concatenate([self.encoder_feed(im) for im in images[i:i + self.max_batch]])
            check_shapes_fit(self.profiles["encoder"], {"image": feed.shape}, "encoder.engine")
            out.append(self.engines["encoder"].run({"image": feed})["image_embeddings"])
        return torch.cat(out)

    def decode(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        """(low-res logits, iou) as device tensors; `embeddings` from `encode` are bound in place."""
        sl = self.mask_slice(multimask)
        feed = decoder_inputs(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, self.embedding_size,
                              self.device)
        check_shapes_fit(self.profiles["decoder"], {k: feed[k].shape for k in ("point_coords", "point_labels")},
                         "decoder.engine")
        engine = self.engines["decoder"]
        out = engine.run_graph(feed) if self.cuda_graph else engine.run(feed)
        return out["low_res_masks"][:, sl].float(), out["iou_predictions"][:, sl].float()


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
        self.engine = TrtEngine.load(self.artifact.part_path(SEMANTIC_PART), trt.Runtime(self._logger))

    def run_graph(self, feed: np.ndarray) -> torch.Tensor:
        self.check_feed(SEMANTIC_PART, "image", feed)
        if self.profiles.get(SEMANTIC_PART):
            check_shapes_fit(self.profiles[SEMANTIC_PART], {"image": feed.shape}, "semantic.engine")
        return self.engine.run({"image": feed})["logits"].float().cpu()  # the final output comes back

    def semantic_logits(self, image_hwc3: np.ndarray) -> torch.Tensor:
        from .semantic import logits_to_original

        logits = self.run_graph(self.encoder_feed(image_hwc3))
        if self.logits_at == "model":
            logits = logits_to_original(logits, image_hwc3.shape[:2], self.img_size)
        return logits
