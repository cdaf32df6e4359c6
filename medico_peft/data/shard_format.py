"""On-disk layout of one HDF5 shard: names, dtypes and the schema check every reader runs.

Keeping the names in one module means the writer, the loader and the docs
(`docs/shard_format.md`) cannot drift apart silently.
"""

from __future__ import annotations

import json

from ..errors import DataError

FORMAT_NAME = "medico_peft.shards"
FORMAT_VERSION = 1
COMPRESSIONS = ("lzf", "gzip", "none")

IMAGES = "images"  # (N, S, S) or (N, C, S, S) uint8, one chunk per slice
LABELS = "labels"  # (N, S, S) uint8 or uint16 label ids, 0 = background
# Per-sample metadata, stored as datasets (HDF5 attributes per sample do not scale).
SOURCE_FILE = "source_file"  # vlen str
VOLUME_ID = "volume_id"  # vlen str
SLICE_INDEX = "slice_index"  # int32
AXIS = "axis"  # int8
SPACING = "spacing"  # float32 (N, 2): in-plane spacing (row, col) of the original slice
INPUT_SIZE = "input_size"  # int32 (N, 2): (h, w) after resize, before padding
ORIGINAL_SIZE = "original_size"  # int32 (N, 2): (H, W) of the original slice
OBJECT_IDS = "object_ids"  # vlen uint16: label ids present in the slice (after min-area filter)
OBJECT_BOXES = "object_boxes"  # vlen int32: 4 per object, x0 y0 x1 y1 inclusive pixel coords

PER_SAMPLE_KEYS = (
    SOURCE_FILE, VOLUME_ID, SLICE_INDEX, AXIS, SPACING, INPUT_SIZE, ORIGINAL_SIZE, OBJECT_IDS, OBJECT_BOXES,
)
REQUIRED_KEYS = (IMAGES, LABELS) + PER_SAMPLE_KEYS
REQUIRED_ATTRS = ("format", "format_version", "modality", "label_names", "normalization", "image_size", "split")


def check_shard(handle, path) -> int:
    """Validate an open h5py file against the schema; return its sample count.

    Raises DataError naming the shard and the first missing or inconsistent key.
    """
    for attr in REQUIRED_ATTRS:
        if attr not in handle.attrs:
            raise DataError(f"{path}: shard attribute '{attr}' is missing (not a medico_peft shard?)")
    if handle.attrs["format"] != FORMAT_NAME:
        raise DataError(f"{path}: attribute 'format' is {handle.attrs['format']!r}, expected {FORMAT_NAME!r}")
    version = int(handle.attrs["format_version"])
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: shard format_version {version} is newer than supported {FORMAT_VERSION}")
    for key in REQUIRED_KEYS:
        if key not in handle:
            raise DataError(f"{path}: shard is missing dataset '{key}'")
    n = handle[IMAGES].shape[0]
    size = int(handle.attrs["image_size"])
    if handle[IMAGES].shape[-2:] != (size, size) or handle[LABELS].shape != (n, size, size):
        raise DataError(
            f"{path}: '{IMAGES}' {handle[IMAGES].shape} / '{LABELS}' {handle[LABELS].shape} "
            f"do not match image_size {size} and each other"
        )
    for key in PER_SAMPLE_KEYS:
        if handle[key].shape[0] != n:
            raise DataError(f"{path}: dataset '{key}' has {handle[key].shape[0]} rows, expected {n} (one per sample)")
    return n


def decode_label_names(raw) -> dict[int, str]:
    """Label names are stored as a JSON object {"id": "name"}; ids come back as ints."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    return {int(k): str(v) for k, v in json.loads(raw).items()}


def encode_label_names(names: dict[int, str]) -> str:
    return json.dumps({str(int(k)): v for k, v in sorted(names.items())})
