"""SliceDataset output contract, determinism, workers, DistributedSampler, weights, eval iterator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from medico_peft.data.augment import IDENTITY_LUT, AugmentConfig, apply_lut, sample_lut
from medico_peft.data.convert import convert
from medico_peft.data.dataset import SliceDataset, iter_eval_slices
from medico_peft.data.labels import LabelSelection
from medico_peft.data.pairing import pair_by_stem
from medico_peft.data.prompts import PromptConfig
from test_data_synthetic import make_nifti_dataset

S = 64


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    dirs = make_nifti_dataset(root, n_volumes=3, shape=(40, 56, 14))  # non-square: padding + rot90 matter
    convert(pair_by_stem(*dirs), root / "a", size=S, split="train", progress=False)
    convert(pair_by_stem(*dirs), root / "b", size=S, split="train", labels=LabelSelection(merge={7: [1, 2]}),
            progress=False)
    return root / "a" / "manifest.json", root / "b" / "manifest.json"


def _check_item(item, n_objects, n_points):
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["masks"].shape == (n_objects, S, S) and item["masks"].dtype == torch.float32
    assert set(item["masks"].unique().tolist()) <= {0.0, 1.0}
    assert item["boxes"].shape == (n_objects, 4) and item["boxes"].dtype == torch.float32
    assert item["points"].shape == (n_objects, n_points, 2) and item["points"].dtype == torch.float32
    assert item["point_labels"].shape == (n_objects, n_points) and item["point_labels"].dtype == torch.int64
    assert item["object_valid"].dtype == torch.bool and item["label_ids"].dtype == torch.int64
    assert item["input_size"].dtype == torch.int64 and item["original_size"].tolist() == [40, 56]
    assert item["index"].dtype == torch.int64 and item["index"].ndim == 0
    h, w = item["input_size"].tolist()
    assert sorted((h, w)) == [46, 64]  # 40x56 -> 46x64, possibly turned by rot90
    image = item["image"][0]
    assert not image[h:].any() and not image[:, w:].any()  # padding stays 0 after augmentation
    for j in range(n_objects):
        mask = item["masks"][j].bool()
        if not item["object_valid"][j]:
            assert not mask.any() and not item["boxes"][j].any() and item["label_ids"][j] == 0
            assert (item["point_labels"][j] == -1).all()
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert ys.max() < h and xs.max() < w
        x0, y0, x1, y1 = item["boxes"][j].tolist()
        assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1
        assert ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).any()
        for (x, y), lab in zip(item["points"][j].tolist(), item["point_labels"][j].tolist()):
            assert lab in (0, 1) and bool(mask[int(y), int(x)]) == (lab == 1)
        # image and masks moved together: the object is bright in the synthetic volumes
        assert image[mask].mean() > image[~mask & (image > 0)].mean()


def test_item_contract_with_augmentation(shard_set):
    ds = SliceDataset(shard_set[0], n_objects=3, prompts=PromptConfig(n_positive=2, n_negative=2, centre_point=True))
    assert len(ds) > 0
    padded = 0
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, 3, 4)
        padded += int((~item["object_valid"]).sum())
    assert padded > 0  # two labels at most: the third object is always padding, never resampled
    batch = default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, S, S) and batch["index"].tolist() == [0, 1]


def test_deterministic_per_seed_epoch_index(shard_set):
    a, b = SliceDataset(shard_set[0], seed=3), SliceDataset(shard_set[0], seed=3)
    for key, value in a[5].items():
        assert torch.equal(value, b[5][key])
    first = a[5]
    a.set_epoch(1)
    assert any(not torch.equal(first[k], a[5][k]) for k in ("image", "boxes", "points", "masks"))


def test_workers_fork_safe_and_match_serial(shard_set):
    ds = SliceDataset(shard_set[0], n_objects=2)
    serial = [ds[i] for i in range(8)]  # opens h5py handles in the parent before forking
    loader = DataLoader(torch.utils.data.Subset(ds, range(8)), batch_size=4, num_workers=2)
    batches = list(loader)
    for i in range(8):
        assert torch.equal(batches[i // 4]["masks"][i % 4], serial[i]["masks"])
        assert torch.equal(batches[i // 4]["image"][i % 4], serial[i]["image"])


def test_distributed_sampler(shard_set):
    ds = SliceDataset(shard_set[0], n_objects=2)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        for batch in DataLoader(ds, batch_size=5, sampler=sampler):
            seen += batch["index"].tolist()
    assert sorted(set(seen)) == list(range(len(ds)))


def test_weights_and_label_filter(shard_set):
    only_b = SliceDataset(list(shard_set), weights=[0, 1], samples_per_epoch=12, augment=None)
    assert len(only_b) == 12
    assert {int(i) for k in range(12) for i in only_b[k]["label_ids"] if i} == {7}
    both = SliceDataset(list(shard_set), weights=[1, 1], samples_per_epoch=40)
    ids = {int(i) for k in range(40) for i in both[k]["label_ids"] if i}
    assert ids == {1, 2, 7}
    only_2 = SliceDataset(shard_set[0], label_ids=[2], n_objects=2)
    assert all(set(only_2[k]["label_ids"].tolist()) == {0, 2} for k in range(len(only_2)))
    with pytest.raises(Exception, match="dataset.weights"):
        SliceDataset(list(shard_set), weights=[1])


def test_eval_iterator(shard_set):
    items = list(iter_eval_slices(shard_set[0], split="train"))
    assert items and len(items) == len(SliceDataset(shard_set[0], augment=None))
    item = items[0]
    assert item["image"].shape == (3, S, S) and item["image"].is_contiguous() and item["image"].max() <= 1
    assert item["label_map"].dtype == torch.int64 and item["label_map"].shape == (S, S)
    assert set(item["label_ids"]) == set(item["label_map"].unique().tolist()) - {0}
    assert item["label_names"] == {i: f"label_{i}" for i in item["label_ids"]}
    assert item["input_size"] == (46, 64) and item["original_size"] == (40, 56)
    assert item["volume_id"].startswith("case") and item["source_file"].endswith(".nii.gz")
    assert item["spacing"] == pytest.approx((1.0, 1.2)) and item["axis"] == 2
    only_1 = list(iter_eval_slices(shard_set[0], split="train", label_ids=[1]))
    assert only_1 and all(i["label_ids"] == [1] for i in only_1)


def test_no_augment_returns_stored_slice(shard_set):
    ds = SliceDataset(shard_set[0], augment=None, prompts=PromptConfig(box_jitter=0.0), n_objects=2)
    first = next(iter_eval_slices(shard_set[0], split="train"))
    item = ds[0]
    assert torch.equal(item["image"], first["image"])
    for j in range(2):
        if item["object_valid"][j]:
            expected = (first["label_map"] == item["label_ids"][j]).float()
            assert torch.equal(item["masks"][j], expected)
            ys, xs = torch.nonzero(expected, as_tuple=True)
            assert item["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


@pytest.mark.parametrize("mask_dtype", ["uint8", "bool"])
def test_mask_dtype_matches_float32_path(shard_set, mask_dtype):
    ref = SliceDataset(shard_set[0], n_objects=3, seed=1, prompts=PromptConfig(n_positive=2, n_negative=1))
    small = SliceDataset(shard_set[0], n_objects=3, seed=1, prompts=PromptConfig(n_positive=2, n_negative=1),
                         mask_dtype=mask_dtype)
    for i in range(len(ref)):
        a, b = ref[i], small[i]
        assert b["masks"].dtype == getattr(torch, mask_dtype) and b["masks"].shape == a["masks"].shape
        assert torch.equal(b["masks"].float(), a["masks"])
        for key in a.keys() - {"masks"}:
            assert torch.equal(a[key], b[key]), key


def test_apply_lut_matches_take():
    rng = np.random.default_rng(0)
    luts = [IDENTITY_LUT] + [sample_lut(AugmentConfig(p_intensity=1.0), rng) for _ in range(3)]
    for shape in ((6, 8), (5, 7), (2, 4, 6)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for view in (image, image[..., ::-1], np.rot90(image, 1, axes=(-2, -1))):
            for lut in luts:
                expected = np.take(lut, view)
                out = np.full(view.shape[:-1] + (view.shape[-1] + 3,), -1, np.float32)
                apply_lut(view, lut, out[..., : view.shape[-1]])  # a non-contiguous destination
                assert np.array_equal(out[..., : view.shape[-1]], expected) and (out[..., view.shape[-1]:] == -1).all()
                dense = np.empty(view.shape, np.float32)
                apply_lut(view, lut, dense)
                assert np.array_equal(dense, expected)


def test_bad_dataset_config(shard_set):
    with pytest.raises(Exception, match="mask_dtype"):
        SliceDataset(shard_set[0], mask_dtype="float16")
    with pytest.raises(Exception, match="n_objects"):
        SliceDataset(shard_set[0], n_objects=0)
    with pytest.raises(Exception, match="augment.gamma"):
        AugmentConfig(gamma=(2.0, 1.0))
    with pytest.raises(Exception, match="no eligible samples"):
        SliceDataset(shard_set[0], split="test")
