"""ONNX-friendly modules around a `MedSam`: the image encoder (optionally with preprocessing in
the graph) and the prompt decoder with SAM's ONNX interface.

The decoder takes `orig_im_size` as an *input* (float h, w) and derives the resized size with
tensor arithmetic, so one graph serves every aspect ratio. It returns all four mask tokens
(index 0 = the single-mask answer, 1..3 = the multimask answers) unless `mask_outputs` narrows it,
so one exported decoder serves `predict(multimask=False)` and `predict(multimask=True)`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.artifacts import MASK_OUTPUTS
from ..runtime.preprocess import preprocess_image, resized_hw, upscale_masks


class EncoderWrapper(nn.Module):
    """image → embeddings. Without preprocessing the input is (1, 3, S, S) in [0, 1] (padded);
    with it, an (H, W, 3) uint8 or float image of any size (resize, intensity, pad in-graph): the one
    shared `preprocess_image` (SAM on uint8: Pillow's fixed-point bilinear resize; padding with the
    pixel mean, so it is 0 after normalising, as official SAM pads)."""

    def __init__(self, model, with_preprocess: bool = False, intensity: str = "minmax"):
        super().__init__()
        self.model = model
        self.with_preprocess = with_preprocess
        self.intensity = intensity

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.with_preprocess:
            image = preprocess_image(image, self.model.img_size, self.intensity, pad_value=self.model.pixel_mean)
        return self.model.image_encoder(self.model.normalize(image))


class DecoderWrapper(nn.Module):
    """SAM's ONNX decoder interface; coordinates are pixels of the *original* image."""

    def __init__(self, model, mask_outputs: str = "all"):
        super().__init__()
        if mask_outputs not in MASK_OUTPUTS:
            raise ValueError(f"mask_outputs: expected one of {list(MASK_OUTPUTS)}, got {mask_outputs!r}")
        self.model = model
        self.mask_slice = MASK_OUTPUTS[mask_outputs]

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe_layer = self.model.prompt_encoder.pe_layer
        pe = pe_layer._pe_encoding((coords + 0.5) / self.model.img_size)
        labels = labels.unsqueeze(-1)
        pe = pe * (labels != -1)
        pe = pe + self.model.prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i, emb in enumerate(self.model.prompt_encoder.point_embeddings):
            pe = pe + emb.weight * (labels == i)
        return pe

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        dense = pe.mask_downscaling(mask_input) * has_mask_input
        return dense + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        h, w = orig_im_size[0], orig_im_size[1]
        nh, nw = resized_hw(h, w, self.model.img_size)
        coords = point_coords * torch.stack([nw / w, nh / h])
        sparse = self._embed_points(coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        low, iou = self.model.decode_all_tokens(image_embeddings, sparse, dense)
        low, iou = low[:, self.mask_slice], iou[:, self.mask_slice]
        # TensorRT builds drop `masks` (see tensorrt_build.strip_full_res_output): there
        # orig_im_size then only feeds arithmetic, never a shape.
        return upscale_masks(low, orig_im_size, self.model.img_size), iou, low
