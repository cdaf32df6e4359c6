"""Annotation tools: a merged vit_b checkpoint loads in micro-sam's model loader (micro-sam builds its models
with segment_anything's `sam_model_registry`; our merged vit_b `.pth` holds exactly the official keys, so
micro-sam `model_type="vit_b"` matches it; LiteMedSAM's TinyViT is not MobileSAM-compatible (1×1 patch
embedding, see REFERENCE.md), so micro-sam's `vit_t` does not load it).

Runs only where micro-sam is installed; the strict load into official `sam_model_registry["vit_b"]` is
tests/test_tuners_merge.py::test_merged_vit_b_checkpoint_loads_into_official_segment_anything.
"""

from __future__ import annotations

import pytest
import torch

from _peft_helpers import perturb_trainable

micro_sam_util = pytest.importorskip("micro_sam.util")


@pytest.mark.slow
def test_merged_vit_b_loads_in_micro_sam_get_sam_model(tmp_path):
    from medico_peft.models import load_model, save_model
    from medico_peft.tuners import PeftConfig, inject, merge

    model = inject(load_model("vit_b"), PeftConfig(rank=4, targets=["q", "v"]))
    perturb_trainable(model, scale=0.01)
    merged = merge(model, strict=True)
    path = save_model(merged, tmp_path / "merged_vit_b.pth")
    predictor = micro_sam_util.get_sam_model(model_type="vit_b", checkpoint_path=str(path), device="cpu")
    theirs = predictor.model.state_dict()
    ours = merged.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k].cpu(), ours[k]) for k in theirs)
