"""Shared by the semantic export / evaluation / predict tests: a tiny LoRA-adapted SemanticSam and its
adapter file, and a small NIfTI data set converted to 128² shards (holds no tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CLASSES = ("background", "ball_a", "ball_b")
SMALL_CHANNELS = [32, 16, 16, 8, 8]  # UNETR widths for vit_tiny at 128² (5 levels): quick on one core


def tiny_semantic(kind: str = "unetr", seed: int = 1):
    """vit_tiny (seeded random base) + a semantic head + LoRA r=4 on q,v with non-zero B (so merging changes
    weights); `class_table` maps classes 1, 2 to the data set's label ids 1, 2."""
    from medico_peft.data.classes import ClassTable
    from medico_peft.models import load_model
    from medico_peft.models.semantic import build_semantic
    from medico_peft.tuners import PeftConfig
    from medico_peft.tuners.semantic import inject_semantic

    sam = load_model("vit_tiny")
    torch.manual_seed(seed)
    model = build_semantic(sam, kind, len(CLASSES), list(CLASSES),
                           channels=SMALL_CHANNELS if kind == "unetr" else None)
    inject_semantic(model, PeftConfig(method="lora", rank=4, targets=["q", "v"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.class_table = ClassTable(names=CLASSES, source_ids=((), (1,), (2,)))
    return model.eval()


def save_tiny_adapter(model, path) -> Path:
    from medico_peft.adapters import save_semantic_adapter

    return save_semantic_adapter(model, path, extra_metadata={"classes": model.class_table.to_dict()})


def make_volume_dataset(root: Path, n_volumes: int = 2, shape=(40, 48, 6)):
    """root/imgs/case{i}.nii.gz + root/labels/case{i}.nii.gz with two labelled balls, and root/names.txt."""
    from test_data_synthetic import make_volume, save_nifti

    imgs, labs = root / "imgs", root / "labels"
    imgs.mkdir(parents=True, exist_ok=True)
    labs.mkdir(parents=True, exist_ok=True)
    for i in range(n_volumes):
        image, label = make_volume(shape, seed=i)
        save_nifti(imgs / f"case{i}.nii.gz", image, (1.0, 1.2, 2.0))
        save_nifti(labs / f"case{i}.nii.gz", label, (1.0, 1.2, 2.0))
    names = root / "names.txt"
    names.write_text("1 ball_a\n2 ball_b\n")
    return imgs, labs, names


def convert_volumes(root: Path, out: Path, size: int = 128) -> Path:
    """The volumes as one test split of shards at `size`²; returns the manifest path."""
    from medico_peft.data.convert import convert
    from medico_peft.data.labels import LabelSelection
    from medico_peft.data.pairing import pair_by_stem

    imgs, labs, names = make_volume_dataset(root)
    report = convert(pair_by_stem(imgs, labs), out, size=size, split="test", min_area=0, empty_share=1.0,
                     labels=LabelSelection(names_file=str(names)), progress=False)
    return report.manifest_path


def image_of_aspect(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = 180 * np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 3) / (w / 5)) ** 2))
    return np.clip(blob + rng.integers(0, 60, (h, w)), 0, 255).astype(np.uint8)
