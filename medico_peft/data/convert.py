"""Convert (image, label) volumes into HDF5 shards + manifest.json.

Each volume is read one slice at a time (two passes: labels, then the kept image slices), so
memory is bounded by the kept output, not the input volume. Volumes can be processed in parallel
processes; shards are written by the main process in input order, so output is deterministic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..utils.config import check_fields, field_prefix, option
from ..utils.paths import staged_folder
from . import normalize
from .labels import LabelMap, LabelSelection
from .manifest import MANIFEST_NAME, Manifest, write_manifest
from .readers import DEFAULT_MAX_IN_MEMORY_MB, read_volume, split_stem
from .resize import resize_image, resize_labels
from .shard_format import COMPRESSIONS, DEFAULT_COMPRESSION, FORMAT_NAME, FORMAT_VERSION, encode_label_names
from .shard_writer import ShardWriter, SliceSample
from .splits import SPLIT_NAMES, SplitFractions, slab_split, split_volumes

log = logging.getLogger(__name__)
SPLIT_MODES = ("volume", "slab") + SPLIT_NAMES  # a split name puts everything into that split
_SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}\.h5$")


@dataclass
class ConvertConfig:
    """Every conversion option; validated once in `validate()` with messages naming `convert.<field>`."""

    modality: str = "mr"  # ct | mr | other (checked with the normalization preset)
    normalization: str | None = None  # preset; None = the modality's default
    size: int = option(256, min=16, max=4096, help="model input size S (256 LiteMedSAM, 1024 SAM ViT)")
    axis: int = option(2, choices=(0, 1, 2), help="slicing axis of 3D volumes (2D inputs are always one slice)")
    empty_share: float = option(0.1, min=0.0, max=1.0, help="share of label-free slices kept (seeded choice)")
    min_area: int = option(10, min=0, help="objects with fewer pixels at size S are set to 0")
    split: str = option("volume", choices=SPLIT_MODES, help="volume | slab | train | val | test")
    split_fractions: tuple = option((0.7, 0.15, 0.15), parse=SplitFractions.parse, help="for split='volume'")
    slab_fractions: tuple = option((0.6, 0.0, 0.3), parse=SplitFractions.parse, help="for split='slab'")
    slab_gap: int = option(5, min=0)
    seed: int = 0
    compression: str = option(DEFAULT_COMPRESSION, choices=COMPRESSIONS,
                              help="shard filter: blosc-lz4 (fast, default), blosc-zstd, lzf, gzip or none")
    max_samples_per_shard: int = option(1000, min=1)
    max_shard_mb: float = option(512.0, gt=0)
    workers: int = option(0, min=0, help="0/1 = in this process")
    max_in_memory_mb: float = DEFAULT_MAX_IN_MEMORY_MB  # larger volumes are streamed per slice
    progress: bool = True

    def validate(self) -> "ConvertConfig":
        with field_prefix("convert"):
            check_fields(self)
        self.normalization = normalize.resolve_preset(self.modality, self.normalization)
        return self


@dataclass
class ConversionReport:
    manifest_path: Path
    samples: dict[str, int]
    volumes: dict[str, str]  # volume id -> split ("slab" for slab-split volumes)
    skipped_volumes: list[str] = field(default_factory=list)  # with the reason
    seconds: float = 0.0

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())


# ---------------------------------------------------------------- one volume


def _check_label_slice(label: np.ndarray, path: Path, k: int) -> np.ndarray:
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise DataError(f"{path}: label slice {k} contains NaN/Inf; labels must be integer ids")
        if not np.all(label == np.round(label)):
            raise DataError(f"{path}: label slice {k} has non-integer values; labels must be integer ids")
    elif label.dtype.kind not in "iub":
        raise DataError(f"{path}: label dtype {label.dtype} is not integer")
    if label.size and label.min() < 0:
        raise DataError(f"{path}: label slice {k} has negative value {label.min()}; ids must be >= 0")
    if label.size and label.max() > 65535:
        raise DataError(f"{path}: label slice {k} has id {int(label.max())} > 65535")
    return label.astype(np.int64, copy=False)


def _objects(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Present ids and their inclusive xyxy boxes, from one pass of scipy's find_objects."""
    from scipy import ndimage

    ids, boxes = [], []
    for i, sl in enumerate(ndimage.find_objects(label.astype(np.int32, copy=False)), 1):
        if sl is not None:
            ids.append(i)
            boxes.extend([sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1])
    return np.array(ids, np.uint16), np.array(boxes, np.int32)


def _drop_small(label: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1 or not label.any():
        return label
    counts = np.bincount(label.ravel())
    small = np.nonzero((counts > 0) & (counts < min_area))[0]
    small = small[small > 0]
    if small.size:
        label = label.copy()
        label[np.isin(label, small)] = 0
    return label


def _volume_seed(seed: int, volume_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{volume_id}".encode()).digest()[:4], "little")


def convert_volume(image_path, label_path, volume_id: str, split: str, cfg: ConvertConfig,
                   label_map: LabelMap) -> Iterator[tuple[str, SliceSample]]:
    """Yield (split, sample) for every kept slice of one volume. `split` may be "slab"."""
    image = read_volume(image_path, is_label=False, max_in_memory_mb=cfg.max_in_memory_mb)
    label = read_volume(label_path, is_label=True, max_in_memory_mb=cfg.max_in_memory_mb)
    if image.shape != label.shape:
        raise DataError(f"{image.path}: image shape {image.shape} differs from label {label.path} shape {label.shape}")
    axis = 2 if image.shape[2] == 1 else cfg.axis
    n = image.shape[axis]
    dtype = np.uint16  # the shard writer narrows to uint8 when every id fits

    # Pass 1: labels -> selection -> resize -> small objects removed; keep only the non-empty ones.
    kept_labels: dict[int, np.ndarray] = {}
    for k in range(n):
        raw = _check_label_slice(label.get_slice(axis, k), label.path, k)
        mapped = label_map.apply(raw)
        if not mapped.any():
            continue
        resized = _drop_small(resize_labels(mapped, cfg.size, np.int64), cfg.min_area)
        if resized.any():
            kept_labels[k] = resized.astype(dtype)
    if not kept_labels:
        warnings.warn(f"{label.path}: no foreground label after selection/min_area; volume '{volume_id}' skipped")
        return

    rng = np.random.default_rng(_volume_seed(cfg.seed, volume_id))
    empty = [k for k in range(n) if k not in kept_labels]
    if split == "slab":
        if n < 2:
            raise ConfigError(f"convert.split: 'slab' needs a 3D volume; {image.path} has one slice")
        positions = slab_split(sorted(kept_labels), cfg.slab_fractions, cfg.slab_gap)
        empty = [k for k in empty if k in positions]
    chosen_empty = rng.choice(empty, size=int(round(cfg.empty_share * len(empty))), replace=False) if empty else []
    slices = sorted(set(kept_labels) | {int(k) for k in chosen_empty})
    if split == "slab":
        slices = [k for k in slices if k in positions]

    # Pass 2: image slices of the kept positions only.
    rng_values = None if cfg.normalization.startswith("ct_") else normalize.sample_values(image, axis)
    window = normalize.intensity_range(cfg.normalization, rng_values)
    spacing = image.in_plane_spacing(axis)
    for k in slices:
        raw = image.get_slice(axis, k)
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            raise DataError(f"{image.path}: image slice {k} (axis {axis}) contains NaN/Inf")
        pixels, input_size = resize_image(window.apply(raw), cfg.size)
        lab = kept_labels.get(k)
        if lab is None:
            lab = np.zeros((cfg.size, cfg.size), dtype)
        ids, boxes = _objects(lab)
        yield (positions[k] if split == "slab" else split), SliceSample(
            image=pixels, label=lab, source_file=str(image.path), volume_id=volume_id, slice_index=int(k),
            axis=axis, spacing=spacing, input_size=input_size, original_size=tuple(int(s) for s in raw.shape),
            object_ids=ids, object_boxes=boxes,
        )


def _convert_volume_list(args) -> list[tuple[str, SliceSample]]:
    """Process-pool entry point: a whole volume's samples, returned to the writer process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(convert_volume(*args))
    return samples, [str(w.message) for w in caught]


# ---------------------------------------------------------------- many volumes


def _volume_ids(pairs) -> list[str]:
    ids = [split_stem(img)[0] for img, _ in pairs]
    seen = {}
    for (img, _), vid in zip(pairs, ids):
        if vid in seen:
            raise DataError(f"{img}: volume id '{vid}' is also used by {seen[vid]}; file stems must be unique")
        seen[vid] = img
    return ids


def _is_shard_set_file(name: str) -> bool:
    """A file of a shard set (replaced by a new conversion), as opposed to anything else in the folder."""
    return name == MANIFEST_NAME or bool(_SHARD_NAME.match(name))


def convert(pairs: Sequence[tuple], out_dir: str | os.PathLike, config: ConvertConfig | None = None,
            labels: LabelSelection | None = None, **overrides) -> ConversionReport:
    """Convert (image, label) path pairs into shards + manifest in `out_dir`.

    `overrides` are ConvertConfig fields (e.g. `size=1024, modality="ct"`). Returns a report;
    raises DataError/ConfigError naming the file or field. The manifest is written last.
    Phases: check inputs -> assign splits -> write shards -> write manifest -> swap the new set in.
    """
    start = time.perf_counter()
    cfg = ConvertConfig(**{**(asdict(config) if config else {}), **overrides}).validate()
    selection = labels or LabelSelection()
    label_map = selection.resolve()
    pairs = _check_pairs(pairs, out_dir)
    ids = _volume_ids(pairs)
    assignment = _assign_splits(ids, cfg)
    out_dir = Path(out_dir)
    tasks = [(img, lab, vid, assignment[vid], cfg, label_map) for (img, lab), vid in zip(pairs, ids)]
    # The new set is written beside `out_dir` and swapped in whole once its manifest is written: until
    # then a previous set in `out_dir` stays complete and loadable (files that are not part of a shard
    # set are kept).
    with staged_folder(out_dir, owned=_is_shard_set_file) as stage:
        written = _write_shards(stage, cfg, label_map, tasks, out_dir)
        manifest = _build_manifest(cfg, label_map, selection, written)
        write_manifest(manifest, stage)
    path = out_dir / MANIFEST_NAME
    return ConversionReport(
        manifest_path=path, samples={s: manifest.splits[s]["n_samples"] for s in SPLIT_NAMES},
        volumes=assignment, skipped_volumes=written.skipped, seconds=time.perf_counter() - start,
    )


def _check_pairs(pairs, out_dir) -> list[tuple[Path, Path]]:
    """Phase 1: every image and label file exists."""
    pairs = [(Path(i), Path(l)) for i, l in pairs]
    if not pairs:
        raise DataError(f"{out_dir}: nothing to convert (no image/label pairs)")
    for img, lab in pairs:
        if not img.exists():
            raise DataError(f"{img}: image file not found")
        if not lab.exists():
            raise DataError(f"{lab}: label file for image {img} not found")
    return pairs


def _assign_splits(ids: list[str], cfg: ConvertConfig) -> dict[str, str]:
    """Phase 2: volume id -> train/val/test (seeded, by volume), "slab", or one fixed split."""
    if cfg.split == "volume":
        return split_volumes(ids, cfg.split_fractions, cfg.seed)
    return {vid: cfg.split for vid in ids}


@dataclass
class _Written:
    entries: list  # shard entries of every split
    seen_ids: set[int]
    volumes_per_split: dict[str, set]
    skipped: list[str]


def _write_shards(out_dir: Path, cfg: ConvertConfig, label_map: LabelMap, tasks: list, final_dir: Path) -> _Written:
    """Phase 3: convert the volumes (in worker processes if asked) and write shards in input order.

    `out_dir` is the staging folder; `final_dir` the folder named in messages."""
    from tqdm import tqdm

    attrs = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "modality": cfg.modality,
        "normalization": cfg.normalization, "image_size": cfg.size,
        "label_names": encode_label_names(label_map.names),
    }
    writers = {s: ShardWriter(out_dir, s, attrs, np.uint8, cfg.compression,
                              cfg.max_samples_per_shard, cfg.max_shard_mb) for s in SPLIT_NAMES}
    out = _Written([], set(), {s: set() for s in SPLIT_NAMES}, [])
    try:
        bar = tqdm(total=len(tasks), desc="convert", unit="vol", disable=not cfg.progress)
        pool = ProcessPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
        results = pool.map(_convert_volume_list, tasks) if pool else (_convert_volume_list(t) for t in tasks)
        try:
            for (img, _, vid, *_), (samples, messages) in zip(tasks, results):
                for message in messages:
                    warnings.warn(message)
                if not samples:
                    out.skipped.append(f"{vid}: {messages[0] if messages else 'no slices kept'}")
                for split, sample in samples:
                    writers[split].add(sample)
                    out.seen_ids.update(int(i) for i in sample.object_ids)
                    out.volumes_per_split[split].add(vid)
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        out.entries = [e for s in SPLIT_NAMES for e in writers[s].close()]
    except BaseException as exc:
        for w in writers.values():
            w.abort(exc)
        raise
    if not out.entries:
        raise DataError(f"{final_dir}: no slice had foreground in any volume; nothing written")
    return out


def _build_manifest(cfg: ConvertConfig, label_map: LabelMap, selection: LabelSelection, written: _Written) -> Manifest:
    """Phase 4: the manifest describing the shards (label names of every id seen, options used)."""
    names = dict(label_map.names)
    for i in written.seen_ids:
        names.setdefault(i, f"label_{i}")
    entries = written.entries
    return Manifest(
        modality=cfg.modality, normalization=cfg.normalization, image_size=cfg.size, label_names=names,
        compression=cfg.compression, shards=entries,
        splits={s: {"n_samples": sum(e.n_samples for e in entries if e.split == s),
                    "volumes": sorted(written.volumes_per_split[s])} for s in SPLIT_NAMES},
        config=_jsonable({**asdict(cfg), "label_selection": asdict(selection)}),
    )


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return str(value)
