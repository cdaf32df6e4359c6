"""The one low-res logit upscaler: ints and tensors give the same result, every user agrees with it."""

from __future__ import annotations

import torch

from medico_peft.models.postprocess import upscale_logits


def test_upscaler_is_shared_by_model_runtime_and_evaluation():
    from medico_peft.evaluation.interactive import logits_to_masks
    from medico_peft.models import load_model
    from medico_peft.runtime.preprocess import resized_hw, upscale_masks

    model = load_model("vit_tiny")
    s = model.img_size
    low = torch.randn(2, 4, s // 4, s // 4, generator=torch.Generator().manual_seed(0))
    for h, w in [(s, s), (37, 91), (120, 45)]:
        nh, nw = resized_hw(h, w, s)
        ref = upscale_logits(low, s, (nh, nw), (h, w))
        assert ref.shape == (2, 4, h, w)
        assert torch.equal(model.upscale_logits(low, (nh, nw), (h, w)), ref)
        as_tensors = upscale_logits(low, s, (torch.tensor(nh), torch.tensor(nw)), torch.tensor([h, w]))
        assert torch.equal(as_tensors, ref)
        assert torch.equal(upscale_masks(low[:1], torch.tensor([h, w], dtype=torch.float32), s), ref[:1])
        assert torch.equal(logits_to_masks(low[:, :1], s, (nh, nw)), upscale_logits(low, s, (nh, nw))[:, 0] > 0)
    assert upscale_logits(low, s).shape == (2, 4, s, s)
