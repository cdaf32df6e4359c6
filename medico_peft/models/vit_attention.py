"""SAM ViT attention without the N×N attention map: decomposed rel-pos folded into q·k, then SDPA.

SAM's attention adds a decomposed relative-position bias to the logits:
    logits[i, j] = scale · q_i·k_j + q_i·Rh[h(i) − h(j)] + q_i·Rw[w(i) − w(j)]
                 = scale · q_i·k_j + rel_h[i, h(j)] + rel_w[i, w(j)],
with rel_h (N × H) and rel_w (N × W) small. That is itself one inner product of augmented vectors,
    q'_i = [scale · q_i, rel_h[i, :], rel_w[i, :]],   k'_j = [k_j, onehot(h(j)), onehot(w(j))],
so `scaled_dot_product_attention(q', k', v, scale=1)` gives the same attention with no bias tensor
and, with a fused kernel, no N×N map in the forward or saved for backward. At 1024² a global block
has N = 4096: the official path keeps 12 heads × 4096² floats = 805 MB of logits and as much of
softmax output per image and block. Gradients reach q, k, v and both rel-pos tables through autograd.
`SdpaAttention` is a drop-in subclass of segment_anything's `Attention`: same parameters, same
state_dict keys, same `qkv`/`proj` submodules (so LoRA/adapter injection sees the same modules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos


def _augmented_qk(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                  hw: tuple[int, int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B·heads, N, C) → q' (B·heads, N, C + H + W), k' (same), with q'·k' = the biased logits."""
    h, w = hw
    bh, n, c = q.shape
    rh = get_rel_pos(h, h, rel_pos_h)  # (H, H, C): Rh[h(i) − h(j)]
    rw = get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(bh, h, w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).reshape(bh, n, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).reshape(bh, n, w)
    q_aug = torch.cat([q * scale, rel_h, rel_w], dim=-1)
    eye_h = torch.eye(h, dtype=k.dtype, device=k.device)
    eye_w = torch.eye(w, dtype=k.dtype, device=k.device)
    onehot_h = eye_h[:, None, :].expand(h, w, h).reshape(1, n, h)  # key j = (hj, wj) → e_{hj}
    onehot_w = eye_w[None, :, :].expand(h, w, w).reshape(1, n, w)
    k_aug = torch.cat([k, onehot_h.expand(bh, n, h), onehot_w.expand(bh, n, w)], dim=-1)
    return q_aug, k_aug


class SdpaAttention(Attention):
    """segment_anything's ViT `Attention` computed with `scaled_dot_product_attention` (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        c = v.shape[-1]
        if self.use_rel_pos:
            q, k = _augmented_qk(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            # The fused (flash) kernels need one head size for q, k and v: zero columns in v add nothing.
            v = F.pad(v, (0, q.shape[-1] - c))
            scale = 1.0
        else:
            scale = self.scale
        # (B, heads, N, ·): SDPA's fused CPU/GPU kernels take 4-D inputs.
        shape = (b, self.num_heads, n)
        out = F.scaled_dot_product_attention(q.reshape(*shape, -1), k.reshape(*shape, -1),
                                             v.reshape(*shape, -1), scale=scale)[..., :c]
        x = out.reshape(b, self.num_heads, h, w, c).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def use_sdpa_attention(encoder: torch.nn.Module) -> int:
    """Switch every official `Attention` in a ViT encoder to `SdpaAttention` in place; returns how many."""
    count = 0
    for module in encoder.modules():
        if type(module) is Attention:
            module.__class__ = SdpaAttention
            count += 1
    return count
