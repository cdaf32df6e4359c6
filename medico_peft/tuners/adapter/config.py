"""Where bottleneck adapters go, per kind, and how many parameters they cost.

- parallel (AdaptFormer): one adapter beside each selected block's MLP, output scaled by
  `adapter_scale`; vit_b, width 64, all 12 blocks: 12 x (768*64+64 + 64*768+768) = 1,189,632.
- sequential (Houlsby / Medical-SAM-Adapter): one adapter after the attention and one after the
  MLP of each selected block, each with its own skip connection.
"""

from __future__ import annotations

# Which block submodules are wrapped, per kind.
WRAPPED = {"parallel": ("mlp",), "sequential": ("attn", "mlp")}


def adapter_param_count(dim: int, bottleneck: int) -> int:
    """Parameters of one bottleneck (down + up projections with biases)."""
    return dim * bottleneck + bottleneck + bottleneck * dim + dim
