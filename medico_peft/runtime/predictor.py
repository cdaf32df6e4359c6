"""One predictor over every backend: the same `set_image` / `predict` call, the same preprocessing,
whichever engine computes the embeddings and the decoder.

Logits at the original size come from `decode_at_original_size`, which the export parity gate
calls too, so what `predict` returns on a backend is exactly what the gate compared: the ONNX
graph's own full-resolution `masks` output when the graph has one (onnxruntime), otherwise the
low-res logits through the shared upscaler (torch, and TensorRT engines, whose decoder is built
without the full-resolution output)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..models.click_prompt import CLICK_MERGE, CLICK_MERGES, CLICK_RADIUS, accept_click, paint_clicks
from .preprocess import as_hwc3, build_prompt_arrays, upscale_masks
from .semantic import SemanticPrediction


def decode_at_original_size(backend, embeddings, coords, labels, mask_input, has_mask_input, orig_hw,
                            multimask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (1, M, H, W) at the original size, low-res logits (1, M, 4E, 4E), iou (1, M)) from `backend`.

    A backend whose graph computes the full-resolution logits itself (`full_res_output` true, e.g. an
    ONNX decoder with its `masks` output) returns them from `decode_full`; for the others the low-res
    logits go through `upscale_masks`, the one upscaler shared with the model and the ONNX graph, on the
    backend's device. The three outputs are returned on the CPU.
    """
    if getattr(backend, "full_res_output", False):
        logits, low, iou = backend.decode_full(embeddings, coords, labels, mask_input, has_mask_input, orig_hw,
                                               multimask)
        return logits.float().cpu(), low.cpu(), iou.cpu()
    low, iou = backend.decode(embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask)
    logits = upscale_masks(low.float(), torch.tensor(orig_hw, dtype=torch.float32), backend.img_size)
    # a device-resident backend (TensorRT) upscales on its device; only these final outputs come back
    return logits.cpu(), low.cpu(), iou.cpu()


@dataclass
class Prediction:
    masks: np.ndarray            # (M, H, W) bool at the original resolution
    scores: np.ndarray           # (M,) predicted IoU
    low_res_logits: np.ndarray   # (M, 4E, 4E) — feed one back as `mask_input` to refine
    logits: np.ndarray           # (M, H, W) float logits at the original resolution


class Predictor:
    """One predictor over torch, onnxruntime and TensorRT backends.

    `click_radius`: when `predict` gets both points and a `mask_input` (the previous answer's low-res
    logits), every positive/negative point is painted into that mask prompt as a ±disk of this many
    mask-grid pixels (models/click_prompt.py) — the same corrective-click encoding the trainer and the
    evaluation protocol use. 0 gives official SAM's behaviour (points as tokens only).

    `click_merge`: how such a correction's answer is accepted. "local" (default, as the evaluation
    protocol and the trainer's validation): the last `new_points` points of the call are this round's
    clicks, and the new logits replace `mask_input` only in the regions the clicks asked to change
    (added pixels touching a positive click, inside the box if one is given; removed pixels touching a
    negative one; models/click_prompt.py
    `merge_click`); the rest of the previous answer is kept. "near": as "local", and only within
    `NEAR_RADII` click radii of each click (for thin structures, `merge_reach`). "none": the decoder's whole
    answer (official SAM).
    """

    def __init__(self, backend, cache_size: int = 4, click_radius: float = CLICK_RADIUS,
                 click_merge: str = CLICK_MERGE):
        if click_merge not in CLICK_MERGES:
            raise DataError(f"click_merge: {click_merge!r} should be one of {', '.join(CLICK_MERGES)}")
        self.backend = backend
        self.click_radius = click_radius
        self.click_merge = click_merge
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._embeddings = None
        self._orig_hw = None

    @classmethod
    def from_torch(cls, model, **kw) -> "Predictor":
        """An interactive `MedSam`, or a `SemanticSam` (then use `predict_semantic`)."""
        from .torch_backend import TorchBackend, TorchSemanticBackend, is_semantic_model

        return cls(TorchSemanticBackend(model) if is_semantic_model(model) else TorchBackend(model), **kw)

    @classmethod
    def from_onnx(cls, folder, threads: int | None = None, providers=None, io_binding: bool | None = None,
                  **kw) -> "Predictor":
        """An interactive or a semantic ONNX export folder (the sidecar's `task` decides). `io_binding` (default:
        on with the CUDA provider) keeps interactive embeddings on the provider's device."""
        from .artifacts import read_onnx_export
        from .ort_backend import OrtBackend, OrtSemanticBackend

        if read_onnx_export(folder).task == "semantic":
            return cls(OrtSemanticBackend(folder, threads=threads, providers=providers), **kw)
        return cls(OrtBackend(folder, threads=threads, providers=providers, io_binding=io_binding), **kw)

    @classmethod
    def from_tensorrt(cls, folder, cuda_graph: bool = False, **kw) -> "Predictor":
        """An interactive or a semantic TensorRT folder (the sidecar's `task` decides). Interactive embeddings stay
        on the GPU; `cuda_graph` replays the decoder from a captured CUDA graph."""
        from .artifacts import read_engine_export
        from .trt_backend import TrtBackend, TrtSemanticBackend

        if read_engine_export(folder).task == "semantic":
            return cls(TrtSemanticBackend(folder), **kw)
        return cls(TrtBackend(folder, cuda_graph=cuda_graph), **kw)

    @property
    def task(self) -> str:
        """"interactive" (set_image + predict) or "semantic" (predict_semantic)."""
        return getattr(self.backend, "task", "interactive")

    @property
    def class_names(self) -> list[str] | None:
        """Semantic predictors: the name of each class index (0 = background); None for interactive ones."""
        return list(self.backend.class_names) if self.task == "semantic" else None

    def require_task(self, task: str, call: str) -> None:
        """Refuse a call made for the other task ("interactive" / "semantic"), saying what to call instead."""
        if self.task == task:
            return
        from ..errors import ConfigError

        if self.task == "semantic":
            names = self.backend.class_names
            raise ConfigError(f"{call}: this {self.backend.name} predictor runs a semantic model ({len(names)} "
                              f"classes: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}), which takes no "
                              "prompts; call predict_semantic(image) (CLI: `medico-peft predict --semantic`)")
        raise ConfigError(f"{call}: this {self.backend.name} predictor runs an interactive model (image encoder + "
                          "prompt decoder), which has no class head; use set_image + predict(box/points), or load a "
                          "semantic adapter / semantic export for predict_semantic")

    def predict_semantic(self, image) -> "SemanticPrediction":
        """Every class at once, no prompts: an H×W[×1|×3] image (uint8 or float) → labels (H, W) and logits
        (C, H, W) at the image's own size. Any size and aspect ratio; 3D volumes: `predict_semantic_volume`."""
        from .semantic import prediction_from_logits

        self.require_task("semantic", "predict_semantic")
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] not in (1, 3):
            raise DataError(f"image: shape {arr.shape} has {arr.shape[2]} channels; expected H×W, H×W×1 or H×W×3 "
                            "(for a 3D volume use predict_semantic_volume(volume, axis))")
        arr = as_hwc3(arr)
        return prediction_from_logits(self.backend.semantic_logits(arr), self.backend.class_names)

    def predict_semantic_volume(self, volume, axis: int = 2, progress=None) -> np.ndarray:
        """Labels of a 3D volume, slice by slice along `axis`; same shape (grid) as `volume`."""
        from .semantic import check_volume, segment_volume

        self.require_task("semantic", "predict_semantic_volume")
        vol = check_volume(volume, axis)
        return segment_volume(self.predict_semantic, vol, axis, len(self.backend.class_names), progress)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def set_image(self, image) -> "Predictor":
        """Encode an image (H×W, H×W×1 or H×W×3; uint8 or float); embeddings are cached by content."""
        self.require_task("interactive", "set_image")
        arr = as_hwc3(image)
        key = hashlib.sha256(arr.tobytes() + str((arr.shape, arr.dtype.str)).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self.backend.encode(arr)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._embeddings = self._cache[key]
        self._orig_hw = (arr.shape[0], arr.shape[1])
        return self

    def encode_images(self, images) -> list[torch.Tensor]:
        """Embeddings of several images (no caching): batched encoder calls when the backend has a batch path
        (`encode_batch`: torch; onnxruntime/TensorRT exports made with `--max-batch`, else they loop) and the
        images share a shape and dtype, else one call per image."""
        arrs = [as_hwc3(im) for im in images]
        batch = getattr(self.backend, "encode_batch", None)
        if batch is not None and len(arrs) > 1 and len({a.shape for a in arrs}) == 1 \
                and len({a.dtype for a in arrs}) == 1:
            out = batch(arrs)
            return [out[i:i + 1] for i in range(len(arrs))]  # (1, C, E, E) each, as `encode` returns
        return [self.backend.encode(a) for a in arrs]

    def set_embeddings(self, embeddings: torch.Tensor, orig_hw: tuple[int, int]) -> "Predictor":
        """Use embeddings computed earlier (`encode_images`) for an image of size `orig_hw`; `predict` follows."""
        self._embeddings = embeddings
        self._orig_hw = (int(orig_hw[0]), int(orig_hw[1]))
        return self

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask: bool = False,
                new_points: int = 1) -> Prediction:
        """Points (x, y) and box (x0, y0, x1, y1) are pixels of the original image. With `mask_input` (the previous
        answer's `low_res_logits`) and points, the call is a correction: the last `new_points` points are the
        new clicks, accepted as `click_merge` says (see the class doc)."""
        self.require_task("interactive", "predict")
        if self._embeddings is None:
            raise DataError("predict: no image set; call set_image(image) first")
        coords, labs = build_prompt_arrays(self._orig_hw, points, labels, box)
        side = 4 * self.backend.embedding_size
        has_mask = 0.0
        merge = None
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.size != side * side:
                raise DataError(f"mask_input: expected {side}×{side} low-res logits, got shape {mask_input.shape}")
            mask_input, has_mask = mask_input.reshape(1, 1, side, side), 1.0
            if points is not None and len(points):
                scale = side / max(self._orig_hw)  # original pixels → mask grid (longest side fills the input)
                if self.click_merge != "none" and new_points > 0:
                    n = len(np.asarray(points).reshape(-1, 2))
                    first = max(0, n - int(new_points))
                    merge = (torch.from_numpy(mask_input.copy()), torch.from_numpy(coords[:, first:n]),
                             torch.from_numpy(labs[:, first:n]), scale)
                mask_input = paint_clicks(torch.from_numpy(mask_input), torch.from_numpy(coords), torch.from_numpy(labs),
                                          scale=scale, radius=self.click_radius).numpy()
        logits, low, iou = decode_at_original_size(self.backend, self._embeddings, coords, labs, mask_input, has_mask,
                                                   self._orig_hw, multimask)
        if merge is not None:
            prev, pts, labs_new, scale = merge
            box_t = None if box is None else torch.tensor(np.asarray(box, np.float32).reshape(1, 4))
            low = accept_click(self.click_merge, prev, low.float(), pts, labs_new, scale=scale,
                               radius=self.click_radius, boxes=box_t)
            logits = upscale_masks(low, torch.tensor(self._orig_hw, dtype=torch.float32), self.backend.img_size)
        return Prediction(masks=(logits[0] > 0).numpy(), scores=iou[0].numpy(), low_res_logits=low[0].numpy(),
                          logits=logits[0].numpy())
