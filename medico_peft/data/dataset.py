"""Torch Dataset over one or more shard sets: a slice, `n_objects` objects from it, their prompts.

HDF5 files are opened lazily in whichever process reads them and reopened after a fork (a handle
must never cross into a DataLoader worker). Every random choice comes from
`default_rng((seed, epoch, index))`, so an item depends only on those three numbers, whatever
worker or DistributedSampler rank fetches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import shard_format as F
from .augment import AugmentConfig, apply_lut, sample_geometry, sample_lut
from .manifest import Manifest, load_manifest
from .prompts import PromptConfig, object_prompts

MAX_SKIP_TRIES = 20
MASK_DTYPES = {"float32": np.float32, "uint8": np.uint8, "bool": np.bool_}


class CorruptSampleError(DataError):
    """A sample could not be read from its shard (bad chunk, truncated file); names shard and sample."""


@dataclass
class _ShardMeta:
    path: Path
    object_ids: list  # per sample: (K,) uint16
    object_boxes: list  # per sample: (K, 4) int64
    input_size: np.ndarray  # (N, 2)
    original_size: np.ndarray  # (N, 2)


def _read_meta(path: Path) -> _ShardMeta:
    import h5py

    F.register_filters()

    try:
        with h5py.File(path, "r") as f:
            F.check_shard(f, path)
            ids = [np.asarray(v, np.int64) for v in f[F.OBJECT_IDS][:]]
            boxes = [np.asarray(v, np.int64).reshape(-1, 4) for v in f[F.OBJECT_BOXES][:]]
            return _ShardMeta(path, ids, boxes, f[F.INPUT_SIZE][:].astype(np.int64),
                              f[F.ORIGINAL_SIZE][:].astype(np.int64))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot open shard ({type(exc).__name__}: {exc})") from None


class _ShardReader:
    """Lazily opened, fork-aware h5py handles (one per shard, per process)."""

    def __init__(self):
        self._handles: dict[Path, object] = {}
        self._dsets: dict[Path, tuple] = {}  # (images, labels): the group lookup costs ~0.3 ms a read
        self._pid = os.getpid()

    def get(self, path: Path):
        if os.getpid() != self._pid:  # inherited through fork: never reuse the parent's handles
            self._handles, self._dsets, self._pid = {}, {}, os.getpid()
        handle = self._handles.get(path)
        if handle is None:
            import h5py

            F.register_filters()
            handle = self._handles[path] = h5py.File(path, "r")
        return handle

    def close(self) -> None:
        if os.getpid() == self._pid:
            for handle in self._handles.values():
                handle.close()
        self._handles, self._dsets = {}, {}

    def __getstate__(self):  # pickled for spawn-started workers: handles never travel
        return {"_handles": {}, "_dsets": {}, "_pid": -1}

    def read(self, path: Path, row: int):
        try:
            f = self.get(path)
            dsets = self._dsets.get(path)
            if dsets is None:
                dsets = self._dsets[path] = (f[F.IMAGES], f[F.LABELS])
            return dsets[0][row], dsets[1][row]
        except Exception as exc:
            raise CorruptSampleError(f"{path}: sample {row} is unreadable ({type(exc).__name__}: {exc})"
                                     f"{F.filter_error_hint(self._dsets.get(path))}") from None


def _label_filter(ids: np.ndarray, label_ids) -> np.ndarray:
    return ids if label_ids is None else ids[np.isin(ids, label_ids)]


class SliceDataset(torch.utils.data.Dataset):
    """Training items (see docs/shard_format.md, "Loader output") from shard set(s).

    manifests: one manifest path/folder or a list; `weights` (one per manifest) switches to
    weighted sampling of a set, then a uniform sample within it. `samples_per_epoch` sets `len()`
    (default: all eligible samples). `label_ids` restricts objects to those ids. Slices without an
    eligible object are left out unless `include_empty`. With `skip_corrupt`, unreadable samples
    are recorded in `self.skipped` (per process: each DataLoader worker has its own list) and
    another sample is returned; otherwise CorruptSampleError is raised. `mask_dtype` "float32"
    (default, the trainer's contract) or "uint8"/"bool": same 0/1 values in a 4x smaller array,
    for loaders that cast on the device (`masks.float()`); at 1024² float32 masks are 20 MB/item.
    """

    def __init__(self, manifests: str | os.PathLike | Sequence, split: str = "train", n_objects: int = 5,
                 prompts: PromptConfig | None = None, augment: AugmentConfig | None = AugmentConfig(),
                 weights: Sequence[float] | None = None, samples_per_epoch: int | None = None, seed: int = 0,
                 label_ids: Sequence[int] | None = None, include_empty: bool = False,
                 skip_corrupt: bool = False, verify: bool = True, mask_dtype: str = "float32"):
        paths = [manifests] if isinstance(manifests, (str, os.PathLike)) else list(manifests)
        if not paths:
            raise ConfigError("dataset.manifests: no manifest given")
        if not isinstance(n_objects, int) or n_objects < 1:
            raise ConfigError(f"dataset.n_objects: {n_objects!r} should be an int >= 1")
        if weights is not None and (len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ConfigError(f"dataset.weights: {weights!r} should be {len(paths)} non-negative numbers, not all 0")
        if mask_dtype not in MASK_DTYPES:
            raise ConfigError(f"dataset.mask_dtype: {mask_dtype!r} should be one of {sorted(MASK_DTYPES)}")
        self.mask_dtype = MASK_DTYPES[mask_dtype]
        self.manifests: list[Manifest] = [load_manifest(p) for p in paths]
        sizes = {m.image_size for m in self.manifests}
        if len(sizes) != 1:
            raise ConfigError(f"dataset.manifests: image sizes differ {sorted(sizes)}; sets must share one input size")
        self.image_size = sizes.pop()
        self.split, self.n_objects, self.seed = split, n_objects, seed
        self.prompts, self.augment = prompts or PromptConfig(), augment
        self.label_ids = None if label_ids is None else np.asarray(sorted(label_ids), np.int64)
        self.skip_corrupt, self.skipped = skip_corrupt, []
        self.epoch = 0
        self.label_names = {}
        self._shards: list[_ShardMeta] = []
        self._sets: list[np.ndarray] = []  # per manifest: (M, 2) rows of (shard number, sample row)
        for manifest in self.manifests:
            if verify:
                manifest.verify(split)
            self.label_names.update(manifest.label_names)
            rows = []
            for entry in manifest.shards_for(split):
                meta = _read_meta(manifest.shard_path(entry))
                shard_no = len(self._shards)
                self._shards.append(meta)
                rows += [(shard_no, r) for r, ids in enumerate(meta.object_ids)
                         if include_empty or _label_filter(ids, self.label_ids).size]
            self._sets.append(np.asarray(rows, np.int64).reshape(-1, 2))
        self._offsets = np.cumsum([0] + [len(s) for s in self._sets])
        total = int(self._offsets[-1])
        if total == 0:
            raise DataError(f"{paths[0]}: split '{split}' has no eligible samples (label_ids={label_ids})")
        self.weights = None if weights is None else np.asarray(weights, float) / float(sum(weights))
        self.length = int(samples_per_epoch or total)
        self._reader = _ShardReader()

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (like DistributedSampler.set_epoch) to draw new augmentations/prompts."""
        self.epoch = int(epoch)

    def _locate(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        if self.weights is None:
            flat = index % int(self._offsets[-1])
            set_no = int(np.searchsorted(self._offsets, flat, side="right") - 1)
            shard_no, row = self._sets[set_no][flat - self._offsets[set_no]]
        else:
            set_no = int(rng.choice(len(self._sets), p=self.weights))
            rows = self._sets[set_no]
            shard_no, row = rows[rng.integers(len(rows))] if len(rows) else self._sets[0][0]
        return int(shard_no), int(row)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        shard_no, row = self._locate(index, rng)
        for _ in range(MAX_SKIP_TRIES):
            meta = self._shards[shard_no]
            try:
                image, label = self._reader.read(meta.path, row)
                return self._make_item(index, meta, row, image, label, rng)
            except CorruptSampleError as exc:
                if not self.skip_corrupt:
                    raise
                self.skipped.append(str(exc))
                set_no = int(rng.integers(len(self._sets)))
                if len(self._sets[set_no]) == 0:
                    continue
                shard_no, row = (int(v) for v in self._sets[set_no][rng.integers(len(self._sets[set_no]))])
        raise CorruptSampleError(f"{meta.path}: {MAX_SKIP_TRIES} consecutive unreadable samples; last: {self.skipped[-1]}")

    def _make_item(self, index, meta: _ShardMeta, row, image, label, rng) -> dict:
        S, n = self.image_size, self.n_objects
        h, w = (int(v) for v in meta.input_size[row])
        all_ids = meta.object_ids[row]
        keep = np.isin(all_ids, self.label_ids) if self.label_ids is not None else np.ones(all_ids.size, bool)
        ids, boxes = all_ids[keep], meta.object_boxes[row][keep]
        chosen = rng.choice(ids.size, size=min(n, ids.size), replace=False) if ids.size else np.zeros(0, np.int64)

        geometry = sample_geometry(self.augment, rng)
        lut = sample_lut(self.augment, rng)
        content = geometry.apply(image[..., :h, :w])
        lab = geometry.apply(label[:h, :w])
        h2, w2 = geometry.size(h, w)
        boxes = geometry.boxes(boxes[chosen], h, w) if chosen.size else np.zeros((0, 4), np.int64)

        pixels = np.empty(image.shape[:-2] + (S, S), np.float32)
        pixels[..., h2:, :] = 0  # zero only the padding: the content region is written once below
        pixels[..., :h2, w2:] = 0
        apply_lut(content, lut, pixels[..., :h2, :w2])
        out_image = torch.from_numpy(pixels)
        out_image = out_image.expand(3, S, S) if out_image.ndim == 2 else out_image[:3]

        cfg = self.prompts
        masks = np.zeros((n, S, S), self.mask_dtype)
        out_boxes = np.zeros((n, 4), np.float32)
        points = np.zeros((n, cfg.n_points, 2), np.float32)
        point_labels = np.full((n, cfg.n_points), -1, np.int64)
        label_ids = np.zeros(n, np.int64)
        for j, (obj, box) in enumerate(zip(ids[chosen], boxes)):
            x0, y0, x1, y1 = (int(v) for v in box)
            masks[j, y0:y1 + 1, x0:x1 + 1] = lab[y0:y1 + 1, x0:x1 + 1] == obj
            out_boxes[j], points[j], point_labels[j] = object_prompts(
                lambda ys, xs, obj=obj: lab[ys, xs] == obj, box, (h2, w2), rng, cfg)
            label_ids[j] = obj
        valid = np.zeros(n, bool)
        valid[: chosen.size] = True
        return {
            "image": out_image,
            "masks": torch.from_numpy(masks),
            "boxes": torch.from_numpy(out_boxes),
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(point_labels),
            "object_valid": torch.from_numpy(valid),
            "label_ids": torch.from_numpy(label_ids),
            "input_size": torch.tensor([h2, w2], dtype=torch.int64),
            "original_size": torch.from_numpy(meta.original_size[row].copy()),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    def close(self) -> None:
        self._reader.close()


def iter_eval_slices(manifest_path, split: str = "test", label_ids: Sequence[int] | None = None,
                     skip_empty: bool = True, verify: bool = True):
    """Yield every slice of a split for evaluation, in shard order, without augmentation.

    Each item: image (3, S, S) float32 in [0, 1]; label_map (S, S) int64 (the full map);
    label_ids (list of present ids, restricted to `label_ids`); label_names {id: name};
    input_size (h, w); original_size (H, W); source_file, volume_id, slice_index, axis,
    spacing (row, col) mm, shard, sample. Slices without a (selected) object are skipped
    unless skip_empty=False.
    """
    import h5py

    manifest = load_manifest(manifest_path)
    if verify:
        manifest.verify(split)
    wanted = None if label_ids is None else np.asarray(sorted(label_ids), np.int64)
    for entry in manifest.shards_for(split):
        path = manifest.shard_path(entry)
        meta = _read_meta(path)
        with h5py.File(path, "r") as f:
            info = {k: f[k][:] for k in (F.SOURCE_FILE, F.VOLUME_ID, F.SLICE_INDEX, F.AXIS, F.SPACING)}
            for row, ids in enumerate(meta.object_ids):
                present = _label_filter(ids, wanted)
                if skip_empty and present.size == 0:
                    continue
                try:
                    image, label = f[F.IMAGES][row], f[F.LABELS][row]
                except Exception as exc:
                    raise CorruptSampleError(f"{path}: sample {row} is unreadable ({type(exc).__name__}: {exc})"
                                             f"{F.filter_error_hint((f[F.IMAGES], f[F.LABELS]))}") from None
                pixels = torch.from_numpy(image.astype(np.float32) / 255.0)
                pixels = pixels.expand(3, *pixels.shape).contiguous() if pixels.ndim == 2 else pixels[:3].contiguous()
                source = info[F.SOURCE_FILE][row]
                volume = info[F.VOLUME_ID][row]
                yield {
                    "image": pixels,
                    "label_map": torch.from_numpy(label.astype(np.int64)),
                    "label_ids": [int(i) for i in present],
                    "label_names": {int(i): manifest.label_names.get(int(i), f"label_{int(i)}") for i in present},
                    "input_size": tuple(int(v) for v in meta.input_size[row]),
                    "original_size": tuple(int(v) for v in meta.original_size[row]),
                    "source_file": source.decode() if isinstance(source, bytes) else str(source),
                    "volume_id": volume.decode() if isinstance(volume, bytes) else str(volume),
                    "slice_index": int(info[F.SLICE_INDEX][row]),
                    "axis": int(info[F.AXIS][row]),
                    "spacing": tuple(float(v) for v in info[F.SPACING][row]),
                    "shard": str(path),
                    "sample": row,
                }
