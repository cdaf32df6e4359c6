"""Append samples to HDF5 shards under temporary names; rename only once a shard is complete.

A shard is closed when it reaches `max_samples` or `max_mb` of (uncompressed) payload, so the
file on disk is at most about that size. Temporary files are deleted if anything fails.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..utils.atomic import atomic_path
from ..utils.hashing import sha256_file
from . import shard_format as F
from .manifest import ShardEntry

_STR = h5py.string_dtype()
_VLEN_U16 = h5py.vlen_dtype(np.dtype("uint16"))
_VLEN_I32 = h5py.vlen_dtype(np.dtype("int32"))


@dataclass
class SliceSample:
    image: np.ndarray  # (S, S) uint8
    label: np.ndarray  # (S, S) uint8/uint16
    source_file: str
    volume_id: str
    slice_index: int
    axis: int
    spacing: tuple[float, float]
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    object_ids: np.ndarray  # (K,) uint16
    object_boxes: np.ndarray  # (K*4,) int32


class ShardWriter:
    """Writes the shards of one split: `<split>-00000.h5`, `<split>-00001.h5`, ...

    Label maps are stored as uint8 while every id fits, else uint16 (readers accept both).
    """

    def __init__(self, out_dir: Path, split: str, attrs: dict, label_dtype=np.uint8,
                 compression: str = F.DEFAULT_COMPRESSION,
                 max_samples: int = 1000, max_mb: float = 512.0, buffer: int = 32):
        self.out_dir, self.split, self.attrs = Path(out_dir), split, attrs
        self.label_dtype, self.compression = label_dtype, compression
        self.max_samples, self.max_bytes, self.buffer = max_samples, max_mb * 2**20, buffer
        self.entries: list[ShardEntry] = []
        self._pending: list[SliceSample] = []
        self._ctx = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def _open(self, sample: SliceSample) -> None:
        name = f"{self.split}-{len(self.entries):05d}.h5"
        self._ctx = atomic_path(self.out_dir / name, suffix=".h5")
        self._tmp = self._ctx.__enter__()
        self._final_name = name
        f = self._file = h5py.File(self._tmp, "w")
        size = sample.image.shape[-1]
        comp = F.dataset_options(self.compression)
        chunk = (1,) + sample.image.shape  # one slice per chunk: a read decodes exactly one slice
        f.create_dataset(F.IMAGES, (0,) + sample.image.shape, np.uint8, maxshape=(None,) + sample.image.shape,
                         chunks=chunk, **comp)
        f.create_dataset(F.LABELS, (0, size, size), self.label_dtype, maxshape=(None, size, size),
                         chunks=(1, size, size), **comp)
        specs = {
            F.SOURCE_FILE: (_STR, ()), F.VOLUME_ID: (_STR, ()), F.SLICE_INDEX: (np.int32, ()),
            F.AXIS: (np.int8, ()), F.SPACING: (np.float32, (2,)), F.INPUT_SIZE: (np.int32, (2,)),
            F.ORIGINAL_SIZE: (np.int32, (2,)), F.OBJECT_IDS: (_VLEN_U16, ()), F.OBJECT_BOXES: (_VLEN_I32, ()),
        }
        for key, (dtype, tail) in specs.items():
            f.create_dataset(key, (0,) + tail, dtype, maxshape=(None,) + tail, chunks=(256,) + tail)
        self._count = 0
        self._bytes = 0

    def add(self, sample: SliceSample) -> None:
        if self.label_dtype == np.uint8 and sample.object_ids.size and int(sample.object_ids.max()) > 255:
            # Labels start as uint8 (half the bytes to read); the first id > 255 ends that shard.
            if self._file is not None:
                self._close_shard()
            self.label_dtype = np.uint16
        if self._file is None:
            self._open(sample)
        self._pending.append(sample)
        self._count += 1
        self._bytes += sample.image.nbytes + sample.label.nbytes
        if len(self._pending) >= self.buffer:
            self._flush()
        if self._count >= self.max_samples or self._bytes >= self.max_bytes:
            self._close_shard()

    def _flush(self) -> None:
        if not self._pending:
            return
        f, batch = self._file, self._pending
        start, n = f[F.IMAGES].shape[0], len(batch)
        columns = {
            F.IMAGES: np.stack([s.image for s in batch]),
            F.LABELS: np.stack([s.label for s in batch]).astype(self.label_dtype, copy=False),
            F.SOURCE_FILE: [s.source_file for s in batch],
            F.VOLUME_ID: [s.volume_id for s in batch],
            F.SLICE_INDEX: np.array([s.slice_index for s in batch], np.int32),
            F.AXIS: np.array([s.axis for s in batch], np.int8),
            F.SPACING: np.array([s.spacing for s in batch], np.float32),
            F.INPUT_SIZE: np.array([s.input_size for s in batch], np.int32),
            F.ORIGINAL_SIZE: np.array([s.original_size for s in batch], np.int32),
        }
        for key, values in columns.items():
            ds = f[key]
            ds.resize(start + n, axis=0)
            ds[start:start + n] = values
        for key, attr in ((F.OBJECT_IDS, "object_ids"), (F.OBJECT_BOXES, "object_boxes")):
            ds = f[key]
            ds.resize(start + n, axis=0)
            for i, s in enumerate(batch):
                ds[start + i] = getattr(s, attr)
        self._pending = []

    def _close_shard(self) -> None:
        self._flush()
        f = self._file
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.attrs["split"] = self.split
        f.attrs["n_samples"] = self._count
        f.close()
        self._file = None
        digest, nbytes = sha256_file(self._tmp), os.path.getsize(self._tmp)
        self._ctx.__exit__(None, None, None)  # chmod to the umask's mode, fsync, rename onto the final name
        self._ctx = None
        self.entries.append(ShardEntry(self._final_name, self.split, self._count, digest, nbytes))

    def close(self) -> list[ShardEntry]:
        if self._file is not None:
            self._close_shard()
        return self.entries

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the shard in progress (its temporary file is removed)."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._ctx is not None:
            with contextlib.suppress(BaseException):
                self._ctx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
            self._ctx = None
