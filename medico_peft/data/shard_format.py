"""On-disk layout of one HDF5 shard: names, dtypes and the schema check every reader runs.

Keeping the names in one module means the writer, the loader and the docs
(`docs/shard_format.md`) cannot drift apart silently.
"""

from __future__ import annotations

import json

from ..errors import DataError

FORMAT_NAME = "medico_peft.shards"
FORMAT_VERSION = 1
# "blosc-lz4" (the default since format 1 shards written by 0.1) is Blosc's LZ4 through the `hdf5plugin`
# package: ~3.4x smaller than "none" on 1024² MR slices and decoded at close to uncompressed speed, where
# lzf/gzip cost 15-20 ms per 1024² slice (benchmarks/results/data.md). "blosc-zstd" is smaller and slower.
# Readers register the plugin filters before opening a shard (`register_filters`); other tools reading our
# shards need `import hdf5plugin` too. lzf/gzip/none shards stay readable with plain h5py.
COMPRESSIONS = ("blosc-lz4", "blosc-zstd", "lzf", "gzip", "none")
DEFAULT_COMPRESSION = "blosc-lz4"

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


# Compression filters
_PLUGIN_HINT = "the hdf5plugin package (a dependency of medico-peft) provides it: pip install hdf5plugin"


def register_filters() -> bool:
    """Make the Blosc/LZ4/Zstd HDF5 filters available to h5py (importing hdf5plugin registers them).
    Returns False when hdf5plugin is missing (lzf/gzip/none shards still read)."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        return False
    return True


def dataset_options(compression: str) -> dict:
    """h5py `create_dataset` keyword arguments for `compression` (one of COMPRESSIONS)."""
    if compression not in COMPRESSIONS:
        raise DataError(f"compression: expected one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if compression == "none":
        return {}
    if compression in ("lzf", "gzip"):
        return {"compression": compression}
    if not register_filters():
        raise DataError(f"compression {compression!r}: the Blosc HDF5 filter is not available; {_PLUGIN_HINT}, "
                        "or convert with --compression lzf")
    import hdf5plugin

    # uint8 images and labels: byte shuffle is a no-op, bit shuffle measured slower to decode. Blosc does not
    # detect a damaged chunk (it can decode garbage without an error, unlike lzf/gzip), so a Fletcher-32
    # checksum is stored per chunk and checked on every read (~0.4 ms per 1024² slice).
    cname = compression.split("-", 1)[1]
    return dict(fletcher32=True, **hdf5plugin.Blosc(cname=cname, clevel=5 if cname == "lz4" else 3,
                                                     shuffle=hdf5plugin.Blosc.NOSHUFFLE))


def filter_error_hint(dsets) -> str:
    """When a read failed: a hint naming the HDF5 compression filters of `dsets` (h5py datasets) that are not
    available in this process, else ''."""
    try:
        import h5py

        ids = sorted({int(fid) for d in dsets or () for fid in d._filters
                      if str(fid).isdigit() and not h5py.h5z.filter_avail(int(fid))})
    except Exception:  # the hint must never hide the original error
        return ""
    if not ids:
        return ""
    return f"; it is compressed with HDF5 filter id {', '.join(map(str, ids))} (32001 = Blosc), not available " \
           f"here: {_PLUGIN_HINT}"
