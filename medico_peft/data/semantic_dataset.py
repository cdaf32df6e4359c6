"""`SemanticSlices`: shard slices as (image, class-index target), the item contract of semantic training."""

from __future__ import annotations

import numpy as np
import torch

from .augment import apply_lut, sample_geometry, sample_lut
from .classes import ClassTable
from .dataset import SliceDataset


class SemanticSlices(SliceDataset):
    """Item: `image` (3, S, S) float32 in [0, 1]; `target` (S, S) int64 class indices (0 = background, the
    zero padding included); `input_size`, `original_size`, `index`.

    Classes come from `table` (`data.classes.class_table`). Slices holding none of the table's labels are
    left out unless `include_empty`. Seeding, augmentation and corrupt-sample skipping are `SliceDataset`'s.
    """

    def __init__(self, manifest, table: ClassTable, split: str = "train", augment=None, samples_per_epoch=None,
                 seed: int = 0, include_empty: bool = False, skip_corrupt: bool = True, verify: bool = True):
        super().__init__(manifest, split=split, n_objects=1, augment=augment, samples_per_epoch=samples_per_epoch,
                         seed=seed, label_ids=table.label_ids, include_empty=include_empty, skip_corrupt=skip_corrupt,
                         verify=verify)
        self.table = table
        self._lut = table.lut(65535)

    def _make_item(self, index, meta, row, image, label, rng) -> dict:
        s = self.image_size
        h, w = (int(v) for v in meta.input_size[row])
        geometry = sample_geometry(self.augment, rng)
        lut = sample_lut(self.augment, rng)
        content = geometry.apply(image[..., :h, :w])
        lab = geometry.apply(label[:h, :w])
        h2, w2 = geometry.size(h, w)
        pixels = np.zeros(image.shape[:-2] + (s, s), np.float32)
        apply_lut(content, lut, pixels[..., :h2, :w2])
        out_image = torch.from_numpy(pixels)
        out_image = out_image.expand(3, s, s) if out_image.ndim == 2 else out_image[:3]
        target = np.zeros((s, s), np.int64)
        target[:h2, :w2] = self._lut[np.asarray(lab, np.int64)]
        return {"image": out_image, "target": torch.from_numpy(target),
                "input_size": torch.tensor([h2, w2], dtype=torch.int64),
                "original_size": torch.from_numpy(meta.original_size[row].copy()),
                "index": torch.tensor(index, dtype=torch.int64)}
