"""Low-res mask logits → logits at the model input or at the original image size: the one upscaler.

Used by `MedSam.upscale_logits`, the evaluator, the runtime predictor and the exported ONNX decoder.
Sizes may be ints or 0-dim tensors: tensors stay tensors (never `int()` of a traced value), so a
traced graph that passes them as tensors stays correct for every input size and aspect ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _size(v):
    return v.to(torch.int64) if isinstance(v, torch.Tensor) else int(v)


def upscale_logits(low_res: torch.Tensor, img_size: int, input_size=None, original_size=None) -> torch.Tensor:
    """(..., M, 4E, 4E) logits → bilinear to S×S, cropped to `input_size` (h, w) (the non-padded
    content), then resized to `original_size` (h, w) when given."""
    x = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    if input_size is not None:
        x = x[..., : _size(input_size[0]), : _size(input_size[1])]
    if original_size is not None:
        x = F.interpolate(x, size=(_size(original_size[0]), _size(original_size[1])), mode="bilinear",
                          align_corners=False)
    return x
