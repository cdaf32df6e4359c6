"""Semantic (automatic, multi-class) prediction shared by every backend: class logits at the image's own
size, labels from them, and whole volumes slice by slice.

A semantic model maps a preprocessed (1, 3, S, S) image to (1, C, S, S) class logits (class 0 =
background). Every backend brings them to the original image size the same way: the content part
of the S×S grid (the image was resized so its longest side is S, then padded bottom/right) is
cropped and resized to (H, W) by `upscale_masks`, the one upscaler of the interactive path — in
torch, in the ONNX graph when it was exported with its preprocessing (`logits_at = "original"`),
or after the graph when it outputs model-size logits (`logits_at = "model"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .preprocess import upscale_masks


@dataclass
class SemanticPrediction:
    labels: np.ndarray          # (H, W) class index per pixel (argmax of the logits), uint8 or uint16
    logits: np.ndarray          # (C, H, W) float32 class logits at the original resolution
    class_names: list[str]      # name of each class index (0 = background)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def mask(self, cls: int | str) -> np.ndarray:
        """Boolean mask of one class, by index or name."""
        index = self.class_names.index(cls) if isinstance(cls, str) else int(cls)
        if not 0 <= index < self.num_classes:
            raise DataError(f"class: {cls!r} is not one of the {self.num_classes} classes {self.class_names}")
        return self.labels == index


def label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.uint16


def logits_to_original(logits: torch.Tensor, orig_hw, img_size: int) -> torch.Tensor:
    """(1, C, S, S) logits on the model's padded input grid → (1, C, H, W) at the original size.

    Traceable with `orig_hw` a tensor (h, w): used by the exported graph and by the runtime alike.
    `upscale_masks` first resizes to S×S, an exact identity for logits already at S×S.
    """
    if not isinstance(orig_hw, torch.Tensor):
        orig_hw = torch.tensor([float(orig_hw[0]), float(orig_hw[1])], dtype=torch.float32)
    return upscale_masks(logits, orig_hw, img_size)


def prediction_from_logits(logits: torch.Tensor, class_names: list[str]) -> SemanticPrediction:
    """(1, C, H, W) logits → SemanticPrediction (labels = argmax over classes)."""
    logits = logits.float()
    if logits.ndim != 4 or logits.shape[0] != 1 or logits.shape[1] != len(class_names):
        raise DataError(f"semantic logits: expected (1, {len(class_names)}, H, W), got {tuple(logits.shape)}")
    labels = logits[0].argmax(dim=0).numpy().astype(label_dtype(len(class_names)))
    return SemanticPrediction(labels=labels, logits=logits[0].numpy(), class_names=list(class_names))


def check_volume(volume, axis: int, name: str = "volume") -> np.ndarray:
    """A 3D numeric array (a trailing singleton 4th axis is dropped) and a valid slicing axis."""
    arr = np.asarray(volume)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{name}: shape {arr.shape} is not a 3D volume; expected X×Y×Z "
                        "(use predict_semantic for one 2D image)")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise DataError(f"{name}: dtype {arr.dtype} not supported; expected integers or floats")
    if axis not in (0, 1, 2):
        raise DataError(f"axis: expected 0, 1 or 2, got {axis}")
    return arr


def segment_volume(predict_slice, volume: np.ndarray, axis: int, num_classes: int, progress=None) -> np.ndarray:
    """Labels of a 3D volume, slice by slice along `axis` (each slice as `np.take(volume, k, axis)`, the
    converter's slicing), stacked back on the same grid: the result has the volume's shape."""
    out = np.zeros(volume.shape, label_dtype(num_classes))
    index = [slice(None)] * 3
    for k in range(volume.shape[axis]):
        index[axis] = k
        out[tuple(index)] = predict_slice(np.ascontiguousarray(volume[tuple(index)])).labels
        if progress is not None:
            progress(k + 1, volume.shape[axis])
    return out
