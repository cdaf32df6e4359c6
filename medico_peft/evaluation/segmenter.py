"""The small "segmenter" protocol the interactive evaluator talks to.

The evaluator only needs two calls: image → embeddings, prompts → low-res logits. Keeping it that
narrow lets a torch `MedSam` (with or without an adapter) and, later, an exported runtime backend
(onnxruntime, TensorRT) be scored by exactly the same protocol code.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Segmenter(Protocol):
    """Anything that embeds one image and decodes prompt batches against the embedding."""

    img_size: int

    def embed(self, image: torch.Tensor) -> Any:
        """(3, S, S) float image in [0, 1] → opaque embeddings for `predict`."""

    def predict(self, embeddings: Any, points: torch.Tensor | None, point_labels: torch.Tensor | None,
                boxes: torch.Tensor | None, mask_input: torch.Tensor | None,
                multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K prompt rows → (low-res logits (K, M, h, w), predicted IoU (K, M)) as CPU float tensors.

        points (K, P, 2) xy pixels of the S×S input, point_labels (K, P) 1/0/-1, boxes (K, 4)
        xyxy, mask_input (K, 1, h, w): low-res logits of a previous `predict`.
        """


class TorchSegmenter:
    """`Segmenter` over an in-memory `MedSam` (base or base + adapter), gradient-free."""

    def __init__(self, model):
        self.model = model
        self.img_size = int(model.img_size)
        self._device = next(model.parameters()).device

    # `run_protocol` passes the slice's content size: the padding is set to 0 after normalising (official SAM's
    # padding, what the Predictor and training feed); segmenters without this attribute get the image only.
    embed_takes_input_size = True

    @torch.inference_mode()
    def embed(self, image: torch.Tensor, input_size=None) -> torch.Tensor:
        size = None if input_size is None else torch.as_tensor(input_size).reshape(1, 2)
        return self.model.encode(image.unsqueeze(0).to(self._device, torch.float32),
                                 None if size is None else size.to(self._device))

    @torch.inference_mode()
    def predict(self, embeddings, points, point_labels, boxes, mask_input, multimask):
        move = lambda t: None if t is None else t.to(self._device)  # noqa: E731
        sparse, dense = self.model.embed_prompts(points=move(points), point_labels=move(point_labels),
                                                 boxes=move(boxes), mask_input=move(mask_input))
        low, iou = self.model.decode(embeddings, sparse, dense, multimask=multimask)
        return low.float().cpu(), iou.float().cpu()


def as_segmenter(model_or_segmenter) -> Segmenter:
    """Wrap a torch model; pass anything already following the protocol through unchanged."""
    if isinstance(model_or_segmenter, torch.nn.Module):
        return TorchSegmenter(model_or_segmenter)
    if isinstance(model_or_segmenter, Segmenter):
        return model_or_segmenter
    raise TypeError(f"expected a MedSam model or a Segmenter, got {type(model_or_segmenter).__name__}")
