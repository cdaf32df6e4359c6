"""Content hashes used to tie adapters, exports and engines to the exact base weights."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_state_dict(state: dict) -> str:
    """The canonical content hash of a state dict ("state sha256", version 1); order- and format-independent.

    Definition (stable: adapter files since format version 1 record it as `base_sha256`): one sha256
    over every `torch.Tensor` entry, in order of the sorted key names (Python string order), each
    contributing, concatenated without separators:

    1. the key, UTF-8 (e.g. ``image_encoder.pos_embed``);
    2. ``str(tuple(shape))``, UTF-8 (e.g. ``(1, 64, 64, 768)``, ``()`` for a scalar);
    3. ``str(dtype)``, UTF-8 (e.g. ``torch.float32``);
    4. the raw element bytes in C (row-major) order, native byte order (little-endian on every
       platform torch supports), nothing for an empty tensor.

    Non-tensor entries are skipped. It depends only on the tensors in memory, never on the file
    they came from (.pth, .safetensors, a trainer checkpoint or random init hash the same when the
    weights are the same). For a `MedSam` the input is `model.state_dict()` of the plain model
    (official key names, persistent buffers included), after any resize to its `img_size`.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
