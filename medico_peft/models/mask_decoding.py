"""SAM's mask decoder in eager torch without its three slow spots: same parameters, same outputs (to float rounding).

Profiled on the 2-core CPU (LiteMedSAM decoder, 2 prompts, one thread), the official modules lose time in
layout and in ops that fall off torch's fast paths, not in arithmetic:
1. *token layout*: `TwoWayTransformer` flattens the image embedding and its positional encoding with
   `permute` and never makes them contiguous, so every `keys + key_pe` (7 per pass over 4096 × 256 floats)
   reads one operand transposed, and each attention projection copies it first. Here the image tokens are
   made (B, HW, C)-contiguous once per call (`two_way_transformer`).
2. *decoder attention*: the attention logits are materialised and soft-maxed over 7 tokens, a softmax
   shape torch's vectorised kernel handles poorly. `DecoderSdpaAttention` (a drop-in subclass of
   segment_anything's decoder `Attention`: same submodules, same `state_dict` keys, so LoRA on
   `q_proj`/`v_proj` still sees the same `nn.Linear`s) uses `scaled_dot_product_attention`.
3. *output upscaling*: each 2×2 stride-2 `ConvTranspose2d` is one matmul `(B·HW, Cin) @ (Cin, 4·Cout)` and a
   pixel shuffle, and `LayerNorm2d` over channels is `layer_norm` over the last dimension when the map stays
   channels-last; torch's transposed-convolution backward was the largest single cost of a training step's
   decoder backward (`upscaled_mask_logits`).
While a graph is being traced or exported (ONNX, TorchScript) the official modules run unchanged, so the
exported graphs keep their ConvTranspose / MatMul-Softmax structure (which onnxruntime and TensorRT run
natively) and the export parity gate compares them with this eager path. An upscaling stack that is not
the official one (e.g. a PEFT wrapper on its convolutions) also runs through its own modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention
from torch import nn


# False runs the official modules everywhere (benchmarks/bench_step_time.py measures before / after with it).
FAST_EAGER = True


def tracing() -> bool:
    """True while torch traces or exports a graph (or FAST_EAGER is off): the official modules run then."""
    return not FAST_EAGER or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


class DecoderSdpaAttention(Attention):
    """segment_anything's mask-decoder `Attention` computed with `scaled_dot_product_attention`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if tracing():
            return super().forward(q, k, v)
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        b, n, c = q.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
            return x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # scale 1/sqrt(C / heads), as SAM
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


def use_sdpa_decoder_attention(mask_decoder: nn.Module) -> int:
    """Switch every official decoder `Attention` in `mask_decoder` to `DecoderSdpaAttention` in place."""
    count = 0
    for module in mask_decoder.modules():
        if type(module) is Attention:
            module.__class__ = DecoderSdpaAttention
            count += 1
    return count


def two_way_transformer(transformer: nn.Module, src: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor):
    """`TwoWayTransformer.forward` on contiguous image tokens: src (B, C, H, W), pe (1 or B, C, H, W),
    tokens (B, T, C) -> (queries (B, T, C), keys (B, HW, C)), as the official forward returns them."""
    if tracing():
        return transformer(src, pe.expand(src.shape[0], -1, -1, -1), tokens)
    b = src.shape[0]
    keys = src.flatten(2).transpose(1, 2).contiguous()
    key_pe = pe.flatten(2).transpose(1, 2).contiguous().expand(b, -1, -1)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def _official_upscaling(upscaling: nn.Module) -> bool:
    parts = list(upscaling.children()) if isinstance(upscaling, nn.Sequential) else []
    return (len(parts) == 5 and type(parts[0]) is nn.ConvTranspose2d and type(parts[1]) is LayerNorm2d
            and type(parts[3]) is nn.ConvTranspose2d
            and all(c.kernel_size == (2, 2) and c.stride == (2, 2) and c.padding == (0, 0) and c.groups == 1
                    and c.dilation == (1, 1) and c.output_padding == (0, 0) and c.bias is not None
                    for c in (parts[0], parts[3])))


def _conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """(B, H, W, Cin) channels-last -> (B, 2H, 2W, Cout): out[2i+a, 2j+d] = x[i, j] @ W[:, :, a, d] + bias."""
    b, h, w, cin = x.shape
    cout = conv.weight.shape[1]
    y = x @ conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # columns ordered (a, d, Cout)
    return y.reshape(b, h, w, 2, 2, cout).transpose(2, 3).reshape(b, 2 * h, 2 * w, cout) + conv.bias


def upscaled_mask_logits(upscaling: nn.Module, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int]):
    """Mask logits (B, T, 4H, 4W) = hyper (B, T, C') · upscaling(keys as a (B, C, H, W) map)."""
    b, _, c = keys.shape
    h, w = hw
    if tracing() or not _official_upscaling(upscaling):
        up = upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        _, cu, hu, wu = up.shape
        return (hyper @ up.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
    conv1, norm, act1, conv2, act2 = upscaling
    y = _conv_transpose_2x2(keys.reshape(b, h, w, c), conv1)
    y = act1(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
    y = act2(_conv_transpose_2x2(y, conv2))  # (B, 4H, 4W, C')
    return (hyper @ y.reshape(b, 16 * h * w, -1).transpose(1, 2)).reshape(b, -1, 4 * h, 4 * w)
