"""The adapter file format (version 1): one `.safetensors` holding only what was trained.

Tensor keys are module paths of the `MedSam` after injection, with peft's adapter name removed
(the same convention as peft's own `adapter_model.safetensors`, minus its `base_model.model.` prefix):

- LoRA/DoRA:           `<module>.lora_A.weight`, `<module>.lora_B.weight`, DoRA `<module>.lora_magnitude_vector`
                       where `<module>` is e.g. `image_encoder.blocks.3.attn.qkv.q` (q/k/v targets split the
                       fused qkv), `image_encoder.blocks.3.attn.proj`, `mask_decoder.transformer.layers.0.self_attn.q_proj`;
- bottleneck adapters: `<block>.mlp.adapter.{down,up}.{weight,bias}` (and `<block>.attn.adapter.*` for sequential);
- trained SAM parts:   official keys, e.g. `mask_decoder.iou_token.weight` (decoder trained fully).

String metadata: `format` ("medico_peft.adapter"), `format_version` (int), `method`, `config`
(PeftConfig JSON), `base_spec` (ModelSpec JSON), `base_sha256`, `library_version`, `created`
(ISO 8601 UTC), `extra` (JSON of caller-supplied metadata).
"""

from __future__ import annotations

import json
import re

FORMAT_NAME = "medico_peft.adapter"
FORMAT_VERSION = 1
# Version 2 = version 1 plus `task` / `semantic` metadata and `head.*` tensors (semantic adapters,
# adapters/semantic.py); interactive files are still written as version 1.
READ_VERSION = 2

_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+\.")
_MAGNITUDE = re.compile(r"\.lora_magnitude_vector\.[^.]+\.weight$")


def file_key(param_name: str) -> str:
    """Model parameter name -> adapter-file key (peft adapter name dropped)."""
    key = _ADAPTER_NAME.sub(r".\1.", param_name)
    return _MAGNITUDE.sub(".lora_magnitude_vector", key)


def build_metadata(model, cfg, extra: dict | None, created: str) -> dict[str, str]:
    from .. import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "method": cfg.method,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "base_spec": json.dumps(model.spec.to_dict(), sort_keys=True),
        "base_sha256": str(model.base_sha256),
        "library_version": __version__,
        "created": created,
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
