"""Where the encoder's attention blocks are, and which of them a `PeftConfig` selects.

ViT (segment_anything) keeps its blocks in `image_encoder.blocks`; TinyViT keeps them in
`image_encoder.layers[1..3].blocks` (layer 0 is convolutional and has no attention). Names are
returned as qualified module names so injectors can build anchored regexes from them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

# Per encoder family: our target name -> module path(s) inside one block.
TARGET_PATHS = {
    "vit": {"q": ["attn.qkv.q"], "k": ["attn.qkv.k"], "v": ["attn.qkv.v"], "qkv": ["attn.qkv"],
            "proj": ["attn.proj"], "mlp": ["mlp.lin1", "mlp.lin2"]},
    "tinyvit": {"q": ["attn.qkv.q"], "k": ["attn.qkv.k"], "v": ["attn.qkv.v"], "qkv": ["attn.qkv"],
                "proj": ["attn.proj"], "mlp": ["mlp.fc1", "mlp.fc2"]},
}


def encoder_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the encoder's attention blocks, in forward order."""
    enc = model.image_encoder
    if hasattr(enc, "blocks"):  # ViT
        return [f"image_encoder.blocks.{i}" for i in range(len(enc.blocks))]
    names = []
    for li, layer in enumerate(enc.layers):
        for bi, block in enumerate(layer.blocks):
            if hasattr(block, "attn"):
                names.append(f"image_encoder.layers.{li}.blocks.{bi}")
    return names


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's attention blocks in order (vit_b: 12, TinyViT/LiteMedSAM: 10)."""
    return [model.get_submodule(name) for name in encoder_block_names(model)]


def select_block_names(model: nn.Module, blocks) -> list[str]:
    """Resolve `blocks` ("all", last N, or explicit indices) against this model's blocks."""
    names = encoder_block_names(model)
    n = len(names)
    spec_name = getattr(getattr(model, "spec", None), "name", "model")
    if blocks == "all":
        return names
    if isinstance(blocks, int):
        if blocks > n:
            raise ConfigError(f"blocks: asked for the last {blocks} blocks but {spec_name} has only {n}")
        return names[n - blocks:]
    bad = [b for b in blocks if b >= n]
    if bad:
        raise ConfigError(f"blocks: index {bad[0]} matches no attention block; {spec_name} has {n} blocks "
                          f"(valid indices 0..{n - 1})")
    return [names[b] for b in blocks]


def target_module_paths(family: str, targets) -> list[str]:
    """Module paths inside a block for our target names (e.g. 'mlp' -> both MLP linears)."""
    table = TARGET_PATHS[family]
    return [path for t in targets for path in table[t]]
