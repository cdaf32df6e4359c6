"""onnxruntime backend over the folder written by `medico-peft export onnx`.

The sessions' inputs/outputs are checked against the sidecar on load, so a graph copied in from
another model fails with the expected and found shapes instead of a cryptic runtime error.
When the decoder graph has its full-resolution `masks` output, `decode_full` returns it (the
graph's own resize and crop), and the Predictor and the parity gate use that, not a torch upscale.

IO binding (`io_binding=True`, the default with the CUDA execution provider): the encoder writes its
embeddings into a torch tensor on the provider's device and the decoder reads them from there by
address, so embeddings never travel to the host between encoder and decoder; only the decoder's final
outputs (masks, low-res logits, IoU) are copied back. The same code runs on the CPU provider (device "cpu"), where tests check
it against plain `session.run`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .artifacts import PARTS, SEMANTIC_PART, check_io, ort_io, read_onnx_export
from .exported_backend import ExportedBackend


def make_session(path: Path, threads: int | None = None, providers=None, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot load this graph ({type(exc).__name__}: {exc})") from None


class OrtBackend(ExportedBackend):
    name = "onnxruntime"
    what = "ONNX export"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, providers=None,
                 io_binding: bool | None = None):
        self._adopt(read_onnx_export(folder))
        folder = self.artifact.folder
        self.sessions = {}
        for part in PARTS:
            path = self.artifact.part_path(part)
            if not path.is_file():
                raise ExportError(f"{path}: missing; expected the {part} graph listed in {self.artifact.sidecar}")
            sess = make_session(path, threads, providers)
            check_io(self.meta["io"][part], ort_io(sess), str(path))
            self.sessions[part] = sess
        enc_out = list(self.sessions["encoder"].get_outputs()[0].shape)
        dec_in = list(self.sessions["decoder"].get_inputs()[0].shape)
        if all(isinstance(d, int) for d in enc_out + dec_in) and enc_out != dec_in:
            raise ExportError(f"{folder}: encoder output {enc_out} does not fit decoder input {dec_in}; "
                              "the two graphs come from different models")
        self._decoder_outputs = [o.name for o in self.sessions["decoder"].get_outputs()]
        self.full_res_output = "masks" in self._decoder_outputs
        on_cuda = "CUDAExecutionProvider" in self.sessions["encoder"].get_providers()
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        self.device = torch.device("cuda" if on_cuda else "cpu")
        self._out_shapes = {part: {o.name: list(o.shape) for o in self.sessions[part].get_outputs()} for part in PARTS}

    def _bind_run(self, part: str, inputs: dict, outputs: dict) -> list:
        """Run `part` with `inputs` (device tensors bound by address, numpy arrays copied once). `outputs` maps
        names to preallocated device tensors (written in place) or to None (allocated by onnxruntime on the
        device and returned copied to the host, in order: these are final outputs)."""
        sess = self.sessions[part]
        binding = sess.io_binding()
        dev_type, dev_id = self.device.type, self.device.index or 0
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                t = value.to(self.device, torch.float32).contiguous()
                inputs[name] = t  # keep alive until the run ends
                binding.bind_input(name, dev_type, dev_id, np.float32, tuple(t.shape), t.data_ptr())
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, t in outputs.items():
            if t is None:
                binding.bind_output(name, dev_type, dev_id)
            else:
                binding.bind_output(name, dev_type, dev_id, np.float32, tuple(t.shape), t.data_ptr())
        sess.run_with_iobinding(binding)
        if all(t is not None for t in outputs.values()):
            return []
        return [torch.from_numpy(a) for a in binding.copy_outputs_to_cpu()]

    def encode(self, image_hwc3: np.ndarray) -> torch.Tensor:
        return self._encode_feed(self.encoder_feed(image_hwc3))

    def _encode_feed(self, feed: np.ndarray) -> torch.Tensor:
        if self.io_binding:
            e = self.embedding_size
            out = torch.empty((feed.shape[0] if not self.with_preprocess else 1, self._embedding_dim(), e, e),
                              dtype=torch.float32, device=self.device)
            self._bind_run("encoder", {"image": feed}, {"image_embeddings": out})
            return out
        (emb,) = self.sessions["encoder"].run(None, {"image": feed})
        return torch.from_numpy(emb)

    def _embedding_dim(self) -> int:
        return int(self._out_shapes["encoder"]["image_embeddings"][1])

    def encode_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, C, E, E) embeddings of `images`, up to the export's `max_batch` per encoder call."""
        step = self.artifact.max_batch
        if step <= 1:
            return torch.cat([self.encode(im) for im in images])
        return torch.cat([self._encode_feed(np.concatenate([self.encoder_feed(im) for im in images[i:i + step]]))
                          for i in range(0, len(images), step)])

    def _run_decoder(self, names, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask):
        sl = self.mask_slice(multimask)
        if self.io_binding:
            feed = decoder_feed(np.zeros(0), coords, labels, mask_input, has_mask_input, orig_hw, self.embedding_size)
            feed["image_embeddings"] = embeddings if isinstance(embeddings, torch.Tensor) else \
                torch.as_tensor(np.asarray(embeddings, np.float32))
            outputs = self._bind_run("decoder", feed, dict.fromkeys(names))
            return [o[:, sl] for o in outputs]
        feed = decoder_feed(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, self.embedding_size)
        outputs = self.sessions["decoder"].run(list(names), feed)
        return [torch.from_numpy(o)[:, sl] for o in outputs]

    def decode(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        """(low-res logits, iou) of the answers to `multimask`."""
        low, iou = self._run_decoder(("low_res_masks", "iou_predictions"), embeddings, coords, labels, mask_input,
                                     has_mask_input, orig_hw, multimask)
        return low, iou

    def decode_full(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        """(the graph's full-resolution `masks` logits at `orig_hw`, low-res logits, iou)."""
        if not self.full_res_output:
            raise ExportError(f"{self.artifact.part_path('decoder')}: this decoder graph has no full-resolution "
                              f"`masks` output (found {self._decoder_outputs})")
        full, low, iou = self._run_decoder(("masks", "low_res_masks", "iou_predictions"), embeddings, coords, labels,
                                           mask_input, has_mask_input, orig_hw, multimask)
        return full, low, iou


def decoder_feed(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, embedding_size: int) -> dict:
    side = 4 * embedding_size
    if mask_input is None:
        mask_input = np.zeros((1, 1, side, side), np.float32)
    return {
        "image_embeddings": np.ascontiguousarray(embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor)
                                                 else np.asarray(embeddings, dtype=np.float32), dtype=np.float32),
        "point_coords": np.asarray(coords, np.float32),
        "point_labels": np.asarray(labels, np.float32),
        "mask_input": np.asarray(mask_input, np.float32).reshape(1, 1, side, side),
        "has_mask_input": np.asarray([has_mask_input], np.float32).reshape(1),
        "orig_im_size": np.asarray(orig_hw, np.float32),
    }


class OrtSemanticBackend(ExportedBackend):
    """A semantic export (one graph, image → class logits) on onnxruntime.

    The graph's input is checked against the sidecar on load; each feed is checked against the graph's
    fixed dimensions before it runs (`check_feed`), so a wrongly sized input is refused by name.
    """

    name = "onnxruntime"
    what = "semantic ONNX export"
    task = "semantic"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, providers=None):
        self._adopt(read_onnx_export(folder))
        self.class_names = [str(n) for n in self.artifact.semantic["class_names"]]
        self.logits_at = self.artifact.semantic["logits_at"]
        path = self.artifact.part_path(SEMANTIC_PART)
        if not path.is_file():
            raise ExportError(f"{path}: missing; expected the semantic graph listed in {self.artifact.sidecar}")
        self.session = make_session(path, threads, providers)
        check_io(self.meta["io"][SEMANTIC_PART], ort_io(self.session), str(path))

    def run_graph(self, feed: np.ndarray) -> torch.Tensor:
        """The graph on an already prepared `image` input (see `encoder_feed`), checked first."""
        self.check_feed(SEMANTIC_PART, "image", feed)
        (logits,) = self.session.run(["logits"], {"image": feed})
        return torch.from_numpy(logits)

    def semantic_logits(self, image_hwc3: np.ndarray) -> torch.Tensor:
        """(1, C, H, W) logits at the image's own size."""
        from .semantic import logits_to_original

        logits = self.run_graph(self.encoder_feed(image_hwc3))
        if self.logits_at == "model":
            logits = logits_to_original(logits, image_hwc3.shape[:2], self.img_size)
        return logits
