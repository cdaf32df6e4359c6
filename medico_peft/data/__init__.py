"""Data stage: convert medical volumes to HDF5 shards, load them as SAM training items.

Public API (see docs/shard_format.md):
    convert(pairs, out_dir, config=None, labels=None, **options) -> ConversionReport
    pair_by_stem(images_dir, labels_dir) -> [(image, label)]
    SliceDataset(manifests, split="train", n_objects=5, prompts=PromptConfig(), augment=AugmentConfig(), ...)
    iter_eval_slices(manifest_path, split="test", label_ids=None)
    build_colin27_aal_shards(out_dir, size=256, labels=None, split="slab")   # train / val / test slabs
    build_mni152_shards(out_dir, size=256, split="slab", tissues=MNI152_TISSUES)
    object_group(label_name) -> "visible" | "cortical" | None
Torch and h5py load only when the dataset/converter modules are first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "convert": "convert", "ConvertConfig": "convert", "ConversionReport": "convert",
    "LabelSelection": "labels", "read_label_names": "labels",
    "pair_by_stem": "pairing", "read_pairs_file": "pairing",
    "SliceDataset": "dataset", "iter_eval_slices": "dataset", "CorruptSampleError": "dataset",
    "PromptConfig": "prompts", "prompts_for_mask": "prompts", "AugmentConfig": "augment",
    "Manifest": "manifest", "load_manifest": "manifest",
    "build_colin27_aal_shards": "real_data", "build_mni152_shards": "real_data",
    "colin27_paths": "real_data", "mni152_volumes": "real_data", "object_group": "real_data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
