"""PyTorch backend: the model's own API (`encode`, `embed_prompts`, `decode`, `upscale_logits`).

`torch_decode` is also the reference the ONNX parity gate compares against, so the exported
decoder is checked against the library's model code, not against the export wrapper.
"""

from __future__ import annotations

import numpy as np
import torch

from .preprocess import intensity_mode, preprocess_image, resized_hw


def torch_encoder_input(model, image_hwc3: np.ndarray) -> torch.Tensor:
    """(1, 3, S, S) on the model's device: the one preprocessing (resize, intensity, pad with the pixel mean)."""
    mode = intensity_mode(model.spec.family, image_hwc3.dtype)
    return preprocess_image(torch.from_numpy(image_hwc3), model.img_size, mode,
                            pad_value=model.pixel_mean.reshape(-1).cpu()).to(model.pixel_mean.device)


def torch_encode(model, image_hwc3: np.ndarray) -> torch.Tensor:
    return model.encode(torch_encoder_input(model, image_hwc3))


def torch_decode(model, embeddings: torch.Tensor, coords, labels, mask_input=None, has_mask_input=0.0,
                 orig_hw=(0, 0), multimask: bool = False):
    """SAM decoder arrays (see `build_prompt_arrays`) → (low-res logits, iou) via the model API."""
    device = embeddings.device
    coords = torch.as_tensor(np.asarray(coords), dtype=torch.float32, device=device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32, device=device)
    h, w = orig_hw
    nh, nw = resized_hw(h, w, model.img_size)
    coords = coords * torch.tensor([nw / w, nh / h], device=device)
    is_point = (labels == 0) | (labels == 1)
    points = pt_labels = boxes = None
    if is_point.any():
        points, pt_labels = coords[is_point].reshape(1, -1, 2), labels[is_point].reshape(1, -1).to(torch.int64)
    if (labels == 2).any():
        boxes = torch.cat([coords[labels == 2], coords[labels == 3]], dim=-1).reshape(1, 4)
    mask = None
    if mask_input is not None and float(np.asarray(has_mask_input).reshape(-1)[0]) > 0:
        mask = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=device)
    sparse, dense = model.embed_prompts(points, pt_labels, boxes, mask)
    return model.decode(embeddings, sparse, dense, multimask=multimask)


class TorchBackend:
    name = "torch"

    def __init__(self, model):
        self.model = model.eval()
        self.img_size = model.img_size
        self.embedding_size = model.spec.embedding_size

    @torch.no_grad()
    def encode(self, image_hwc3: np.ndarray) -> torch.Tensor:
        return torch_encode(self.model, image_hwc3)

    @torch.no_grad()
    def encode_batch(self, images_hwc3: list[np.ndarray]) -> torch.Tensor:
        """Several images through the encoder in one (B, 3, S, S) call: (B, C, E, E), like the exported
        backends' `encode_batch`; each row equals `encode` of that image."""
        return self.model.encode(torch.cat([torch_encoder_input(self.model, a) for a in images_hwc3]))

    @torch.no_grad()
    def decode(self, embeddings, coords, labels, mask_input, has_mask_input, orig_hw, multimask: bool):
        low, iou = torch_decode(self.model, embeddings, coords, labels, mask_input, has_mask_input, orig_hw,
                                multimask)
        return low.float().cpu(), iou.float().cpu()


def semantic_class_names(model) -> list[str]:
    """The class names of a semantic model (one per output channel, 0 = background)."""
    return [str(n) for n in model.class_names]


def is_semantic_model(model) -> bool:
    """A model whose forward maps images to class logits (`models.semantic.SemanticSam`)."""
    from ..models.semantic import SemanticSam

    return isinstance(model, SemanticSam)


class TorchSemanticBackend:
    """A `SemanticSam` behind the semantic entry point: image → (1, C, H, W) logits at the original size."""

    name = "torch"
    task = "semantic"

    def __init__(self, model):
        if not is_semantic_model(model):
            raise TypeError(f"TorchSemanticBackend needs a SemanticSam, got {type(model).__name__}")
        self.model = model.eval()
        self.img_size = model.sam.img_size
        self.family = model.sam.spec.family
        self.class_names = semantic_class_names(model)

    def model_input(self, image_hwc3: np.ndarray) -> torch.Tensor:
        mode = intensity_mode(self.family, image_hwc3.dtype)
        device = self.model.sam.pixel_mean.device
        return preprocess_image(torch.from_numpy(image_hwc3), self.img_size, mode).to(device)

    @torch.no_grad()
    def semantic_logits(self, image_hwc3: np.ndarray) -> torch.Tensor:
        from .semantic import logits_to_original

        logits = self.model(self.model_input(image_hwc3)).float().cpu()
        return logits_to_original(logits, image_hwc3.shape[:2], self.img_size)
