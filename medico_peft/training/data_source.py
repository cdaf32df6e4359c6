"""Datasets for the trainer: the shard-backed `SliceDataset`, or generated slices for smoke tests.

The synthetic slices follow the same item contract as `medico_peft.data.SliceDataset` (see
docs/shard_format.md) so that everything downstream is exercised without any data on disk.
Skipped corrupt samples are counted per item (`skipped`), which survives DataLoader workers,
where the dataset's own `skipped` list lives in each worker process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


class SyntheticSlices(torch.utils.data.Dataset):
    """Bright ellipses on a noisy background; deterministic per (seed, index), no augmentation."""

    def __init__(self, n: int, size: int, n_objects: int = 3, seed: int = 0):
        self.n, self.size, self.n_objects, self.seed = n, size, n_objects, seed
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:  # same interface as SliceDataset
        pass

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = np.random.default_rng((self.seed, index))
        s, n = self.size, self.n_objects
        yy, xx = np.mgrid[0:s, 0:s]
        image = rng.normal(0.2, 0.05, (s, s)).astype(np.float32)
        count = int(rng.integers(1, n + 1))
        masks = np.zeros((n, s, s), np.float32)
        boxes = np.zeros((n, 4), np.float32)
        points = np.zeros((n, 1, 2), np.float32)
        for j in range(count):
            cy, cx = rng.uniform(0.25 * s, 0.75 * s, 2)
            ry, rx = rng.uniform(0.08 * s, 0.2 * s, 2)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            masks[j] = m
            image[m] += 0.3 + 0.15 * j
            ys, xs = np.nonzero(m)
            boxes[j] = (xs.min(), ys.min(), xs.max(), ys.max())
            k = rng.integers(len(xs))
            points[j, 0] = (xs[k], ys[k])
        valid = np.arange(n) < count
        img = torch.from_numpy(np.clip(image, 0, 1)).expand(3, s, s).contiguous()
        return {
            "image": img, "masks": torch.from_numpy(masks), "boxes": torch.from_numpy(boxes),
            "points": torch.from_numpy(points), "point_labels": torch.from_numpy(np.where(valid, 1, -1)[:, None]),
            "object_valid": torch.from_numpy(valid), "label_ids": torch.arange(1, n + 1),
            "input_size": torch.tensor([s, s]), "original_size": torch.tensor([s, s]),
            "index": torch.tensor(index),
        }


class CountSkipped(torch.utils.data.Dataset):
    """Adds `skipped` (samples the wrapped dataset skipped while producing this item) to every item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def messages(self) -> list[str]:
        return getattr(self.dataset, "skipped", [])

    def __getitem__(self, index):
        before = len(self.messages)
        item = dict(self.dataset[index])
        item["skipped"] = torch.tensor(len(self.messages) - before)
        return item


def build_datasets(cfg, img_size: int):
    """(train, val) datasets for a `TrainConfig`; val is None when the split is empty or absent."""
    d = cfg.data
    if d.synthetic > 0:
        n_val = max(2, d.synthetic // 4)
        train = SyntheticSlices(d.synthetic, img_size, d.n_objects, seed=cfg.train.seed)
        val = SyntheticSlices(n_val, img_size, d.n_objects, seed=cfg.train.seed + 10_000)
        return CountSkipped(train), CountSkipped(val)
    manifests = [manifest_file(m) for m in (d.manifest if isinstance(d.manifest, list) else [d.manifest])]
    from ..data import AugmentConfig, SliceDataset, load_manifest

    infos = [load_manifest(m) for m in manifests]
    for manifest, info in zip(manifests, infos):
        if info.image_size != img_size:
            raise DataError(f"{manifest}: shards are {info.image_size}² but the model takes {img_size}² input; "
                            f"convert with size={img_size} or choose a matching model")
        if not info.shards_for(d.train_split):
            raise DataError(f"{manifest}: split '{d.train_split}' has no shards (data.train_split)")
    common = dict(n_objects=d.n_objects, seed=cfg.train.seed, label_ids=d.label_ids, skip_corrupt=d.skip_corrupt,
                  verify=d.verify)
    one = len(manifests) == 1
    train = SliceDataset(manifests[0] if one else manifests, split=d.train_split,
                         augment=AugmentConfig() if d.augment else None, weights=d.weights,
                         samples_per_epoch=d.samples_per_epoch, **common)
    # Validation: every val slice of every manifest that has a val split (no weights: each slice once).
    with_val = [m for m, info in zip(manifests, infos) if info.shards_for(d.val_split)]
    val = None
    if with_val:
        val = SliceDataset(with_val[0] if len(with_val) == 1 else with_val, split=d.val_split, augment=None,
                           samples_per_epoch=d.max_val_samples, **common)
    return CountSkipped(train), (CountSkipped(val) if val is not None else None)


def manifest_file(path) -> Path:
    """data.manifest (a manifest.json or its folder) → the manifest file; a clear error if it is missing."""
    manifest = Path(path)
    if manifest.is_dir():
        manifest = manifest / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest} not found; convert data first (medico-peft convert) "
                        f"or point data.manifest at a shard set's manifest.json")
    return manifest
