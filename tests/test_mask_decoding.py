"""The eager mask decoder (models/mask_decoding.py) against segment_anything's own modules.

Reference: an official `MaskDecoder` (official `TwoWayTransformer`, `Attention`, ConvTranspose upscaling)
built by segment_anything and loaded with the same state_dict. Forward outputs and every gradient must
agree to float rounding; traced graphs must still hold the official operators.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention

from medico_peft.models import build_model
from medico_peft.models.mask_decoding import DecoderSdpaAttention, _official_upscaling, upscaled_mask_logits


def _official_decoder(model) -> MaskDecoder:
    md = model.mask_decoder
    ref = MaskDecoder(num_multimask_outputs=3, transformer_dim=md.transformer_dim,
                      transformer=TwoWayTransformer(depth=2, embedding_dim=md.transformer_dim,
                                                    mlp_dim=md.transformer.layers[0].mlp.lin1.out_features,
                                                    num_heads=md.transformer.num_heads),
                      iou_head_depth=3, iou_head_hidden_dim=md.iou_prediction_head.layers[0].out_features)
    ref.load_state_dict(md.state_dict())
    assert not any(isinstance(m, DecoderSdpaAttention) for m in ref.modules())
    return ref


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("litemedsam")
    assert all(type(a) is DecoderSdpaAttention for a in m.mask_decoder.modules() if isinstance(a, Attention))
    return m


def _inputs(model, k=3):
    gen = torch.Generator().manual_seed(1)
    e = model.spec.embedding_size
    emb = torch.randn(1, model.spec.prompt_dim, e, e, generator=gen)
    boxes = torch.tensor([[10.0, 12, 60, 70], [30, 40, 200, 220], [0, 0, 255, 255]])[:k]
    with torch.no_grad():
        sparse, dense = model.embed_prompts(boxes=boxes)
    return emb, sparse, dense


def test_forward_equals_the_official_decoder(model):
    ref = _official_decoder(model)
    emb, sparse, dense = _inputs(model)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        low, iou = model.decode_all_tokens(emb, sparse, dense)
        for row in range(sparse.shape[0]):
            want, want_iou = ref.predict_masks(emb, pe, sparse[row:row + 1], dense[row:row + 1])
            torch.testing.assert_close(low[row:row + 1], want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[row:row + 1], want_iou, atol=1e-5, rtol=1e-4)


def test_gradients_equal_the_official_decoder(model):
    """Every decoder parameter's gradient, and the embedding's, as the official modules give them."""
    ref = _official_decoder(model)
    emb, sparse, dense = _inputs(model, k=1)
    pe = model.prompt_encoder.get_dense_pe().detach()
    target = torch.rand(1, 1, 4 * emb.shape[-2], 4 * emb.shape[-1], generator=torch.Generator().manual_seed(2))

    def grads(run, params):
        x = emb.clone().requires_grad_(True)
        low, iou = run(x)
        loss = ((low[:, :1] - target) ** 2).mean() + iou.square().mean()
        named = dict(params)
        got = torch.autograd.grad(loss, [x, *named.values()])
        return dict(zip(["embedding", *named], got))

    model.zero_grad()
    ours = grads(lambda x: model.decode_all_tokens(x, sparse, dense), model.mask_decoder.named_parameters())
    theirs = grads(lambda x: ref.predict_masks(x, pe, sparse, dense), ref.named_parameters())
    assert ours.keys() == theirs.keys() and len(ours) > 20
    for name in ours:  # relative to each gradient's size; k_proj.bias's is zero in exact arithmetic (softmax shift)
        assert (ours[name] - theirs[name]).abs().max() <= 1e-4 * theirs[name].abs().max() + 1e-8, name


def test_traced_graph_keeps_the_official_operators(model):
    """While tracing (the ONNX exporter traces) the official modules run: ConvTranspose, explicit softmax."""
    emb, sparse, dense = _inputs(model, k=1)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = model

        def forward(self, e, s, d):
            return self.sam.decode_all_tokens(e, s, d)

    with torch.no_grad():
        traced = torch.jit.trace(Decode(), (emb, sparse, dense), check_trace=False)
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert "aten::_convolution" in kinds and "aten::softmax" in kinds
        assert "aten::scaled_dot_product_attention" not in kinds
        torch.testing.assert_close(traced(emb, sparse, dense)[0], model.decode_all_tokens(emb, sparse, dense)[0],
                                   atol=1e-4, rtol=1e-4)


def test_a_wrapped_upscaling_runs_through_its_own_modules(model):
    """A non-official upscaling stack (e.g. a PEFT wrapper on a convolution) is not bypassed."""
    import copy

    class Shifted(torch.nn.ConvTranspose2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    upscaling = copy.deepcopy(model.mask_decoder.output_upscaling)
    assert _official_upscaling(upscaling)
    wrapped = Shifted(upscaling[0].in_channels, upscaling[0].out_channels, 2, 2)
    wrapped.load_state_dict(upscaling[0].state_dict())
    upscaling[0] = wrapped
    assert not _official_upscaling(upscaling)
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 16 * 16, 256, generator=gen)
    hyper = torch.randn(1, 4, 32, generator=gen)
    with torch.no_grad():
        got = upscaled_mask_logits(upscaling, keys, hyper, (16, 16))
        up = upscaling(keys.transpose(1, 2).reshape(1, 256, 16, 16))
    torch.testing.assert_close(got, (hyper @ up.reshape(1, 32, -1)).reshape(1, 4, 64, 64))


def test_fast_eager_off_runs_the_official_modules(model, monkeypatch):
    """The switch bench_step_time's *before* uses: no SDPA, ConvTranspose upscaling (outputs equal)."""
    import medico_peft.models.mask_decoding as mask_decoding

    emb, sparse, dense = _inputs(model, k=1)
    calls = []
    monkeypatch.setattr(torch.nn.ConvTranspose2d, "forward",
                        lambda self, x, _f=torch.nn.ConvTranspose2d.forward: calls.append(1) or _f(self, x))
    with torch.no_grad():
        fast = model.decode_all_tokens(emb, sparse, dense)[0]
        assert not calls
        monkeypatch.setattr(mask_decoding, "FAST_EAGER", False)
        slow = model.decode_all_tokens(emb, sparse, dense)[0]
    assert len(calls) == 2
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
