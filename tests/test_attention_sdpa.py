"""SdpaAttention (models/vit_attention.py) equals segment_anything's ViT Attention, without the N×N map."""

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from medico_peft.models import build_model
from medico_peft.models.vit_attention import SdpaAttention, use_sdpa_attention
from medico_peft.utils.tensor_memory import TensorMemoryTracker


def _pair(dim, heads, size):
    torch.manual_seed(0)
    ref = Attention(dim, heads, True, True, False, (size, size))
    with torch.no_grad():  # rel-pos tables are zero-initialised; make them matter
        ref.rel_pos_h.normal_(0, 0.5)
        ref.rel_pos_w.normal_(0, 0.5)
    new = SdpaAttention(dim, heads, True, True, False, (size, size))
    new.load_state_dict(ref.state_dict())
    return ref, new


@pytest.mark.parametrize("size", [7, 14])
def test_outputs_and_gradients_equal_official_attention(size):
    ref, new = _pair(64, 4, size)
    x = torch.randn(2, size, size, 64)
    outs, grads = [], []
    for mod in (ref, new):
        xi = x.clone().requires_grad_(True)
        y = mod(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in mod.parameters()])
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    for g_ref, g_new in zip(*grads):
        assert (g_ref - g_new).abs().max().item() <= 1e-5 * max(1.0, g_ref.abs().max().item())


def test_windowed_block_with_padding_equals_official():
    torch.manual_seed(1)
    ref = Block(64, 4, use_rel_pos=True, window_size=5, input_size=(5, 5))
    with torch.no_grad():
        ref.attn.rel_pos_h.normal_(0, 0.5)
        ref.attn.rel_pos_w.normal_(0, 0.5)
    new = Block(64, 4, use_rel_pos=True, window_size=5, input_size=(5, 5))
    new.load_state_dict(ref.state_dict())
    assert use_sdpa_attention(new) == 1 and isinstance(new.attn, SdpaAttention)
    x = torch.randn(1, 12, 12, 64)  # 12 is not a multiple of 5: padded windows
    assert (ref(x) - new(x)).abs().max().item() <= 1e-5


def test_built_vit_uses_sdpa_and_keeps_state_dict_keys():
    model = build_model("vit_tiny", seed=0)
    attns = [m for m in model.image_encoder.modules() if isinstance(m, Attention)]
    assert attns and all(type(m) is SdpaAttention for m in attns)
    assert any(k.endswith("attn.rel_pos_h") for k in model.state_dict())


def test_global_attention_never_holds_the_n_by_n_map():
    size, heads = 32, 4  # N = 1024 tokens: one fp32 attention map is heads·N² = 16 MiB
    ref, new = _pair(64, heads, size)
    x = torch.randn(1, size, size, 64, requires_grad=True)
    n_sq = heads * (size * size) ** 2 * 4
    peaks = {}
    for name, mod in (("official", ref), ("sdpa", new)):
        tracker = TensorMemoryTracker()
        tracker.register_model(mod)
        with tracker:
            mod(x).sum().backward()
        peaks[name] = tracker.peak_by_category["activations"] + tracker.peak_by_category["gradients"]
        tracker.remove_hooks()
    assert peaks["official"] > 2 * n_sq  # logits and softmax output, both kept for backward
    assert peaks["sdpa"] < n_sq  # less than a single attention map, all of forward and backward
