"""Memory and speed switches for training: precision, activation checkpointing, frozen prefix, feature cache.

The image encoder is split into *segments* (patch embedding, each block, downsampling, neck) whose
composition equals its forward. Segments before the first one holding a trainable parameter form
the *frozen prefix*: they run under `no_grad`, so none of their activations are kept for backward.
With LoRA on late blocks only, that is most of the encoder. When images are not augmented, the
prefix output of a slice never changes, so it is computed once and cached (for decoder-only
training the prefix is the whole encoder, and the cache holds the image embeddings).
For LiteMedSAM the conv stage at full 256² resolution dominates the encoder's cost and is always
in the prefix, which is why the cache is the big CPU win.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Callable

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

Segment = tuple[str, nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def encoder_segments(encoder: nn.Module, family: str) -> list[Segment]:
    """(name, module owning the parameters, function) triples whose composition is the encoder forward.

    Modules are looked up now, after any PEFT injection, so wrapped blocks are the ones that run.
    """
    segs: list[Segment] = []
    if family == "vit":
        def embed(x, enc=encoder):
            x = enc.patch_embed(x)
            return x + enc.pos_embed if enc.pos_embed is not None else x

        stem = nn.ModuleDict({"patch_embed": encoder.patch_embed})
        if encoder.pos_embed is not None:
            stem.register_parameter("pos_embed", encoder.pos_embed)
        segs.append(("patch_embed", stem, embed))
        for i, blk in enumerate(encoder.blocks):
            segs.append((f"blocks.{i}", blk, blk))
        segs.append(("neck", encoder.neck, lambda x, neck=encoder.neck: neck(x.permute(0, 3, 1, 2))))
        return segs
    # TinyViT: patch embedding and the conv stage (with its downsampling) are one segment.
    segs.append(("patch_embed", encoder.patch_embed, encoder.patch_embed))
    for li, layer in enumerate(encoder.layers):
        for bi, blk in enumerate(layer.blocks):
            segs.append((f"layers.{li}.blocks.{bi}", blk, blk))
        if layer.downsample is not None:
            segs.append((f"layers.{li}.downsample", layer.downsample, layer.downsample))

    def neck(x, enc=encoder):
        b, _, c = x.shape
        return enc.neck(x.view(b, enc.out_res, enc.out_res, c).permute(0, 3, 1, 2))

    segs.append(("neck", encoder.neck, neck))
    # Merge the conv stage into the stem: it is never adapted and never worth splitting.
    n_conv = len(encoder.layers[0].blocks) + (encoder.layers[0].downsample is not None)
    stem_mods = nn.ModuleList([s[1] for s in segs[: 1 + n_conv]])
    fns = [s[2] for s in segs[: 1 + n_conv]]

    def stem(x, fns=fns):
        for f in fns:
            x = f(x)
        return x

    return [("stem", stem_mods, stem)] + segs[1 + n_conv:]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def prefix_length(segments: list[Segment]) -> int:
    """Number of leading segments without trainable parameters."""
    for i, (_, module, _) in enumerate(segments):
        if _trainable(module):
            return i
    return len(segments)


class FeatureCache:
    """Prefix outputs per image (keyed by a content hash), stored in a compact dtype up to a memory budget."""

    def __init__(self, dtype: torch.dtype = torch.float16, max_bytes: float = 4e9):
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.bytes = 0
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(images: torch.Tensor) -> list[str]:
        """Content fingerprints: a replaced (corrupt) or re-sampled slice can never hit a stale entry."""
        import hashlib

        flat = images.detach().to("cpu", torch.float32).contiguous().reshape(images.shape[0], -1)
        return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).hexdigest() for row in flat]

    def get(self, keys: list[str]):
        """The batch stacked from stored entries (a tensor, or a tuple when tuples were put), or None."""
        if all(k in self.store for k in keys):
            self.hits += len(keys)
            first = self.store[keys[0]]
            if isinstance(first, tuple):
                return tuple(torch.stack([self.store[k][i] for k in keys]) for i in range(len(first)))
            return torch.stack([self.store[k] for k in keys])
        self.misses += len(keys)
        return None

    def put(self, keys: list[str], features) -> None:
        """Store per-image features: a (B, ...) tensor, or a tuple of them (prefix output plus encoder taps)."""
        parts = features if isinstance(features, tuple) else (features,)
        item = torch.empty((), dtype=self.dtype).element_size()
        for j, k in enumerate(keys):
            if k in self.store:
                continue
            size = sum(p[j].numel() for p in parts) * item
            if self.bytes + size > self.max_bytes:
                return
            entry = tuple(p[j].detach().to(self.dtype).contiguous().clone() for p in parts)
            self.store[k] = entry if isinstance(features, tuple) else entry[0]
            self.bytes += size


class SegmentedEncoder(nn.Module):
    """Runs the encoder segment by segment with the configured memory policy."""

    def __init__(self, model: nn.Module, frozen_prefix: bool = True, checkpointing: bool = False,
                 cache: FeatureCache | None = None):
        super().__init__()
        self.model = model
        self.segments = encoder_segments(model.image_encoder, model.spec.family)
        self.n_prefix = prefix_length(self.segments) if frozen_prefix else 0
        self.checkpointing = checkpointing
        self.cache = cache if self.n_prefix > 0 else None

    def describe(self) -> str:
        names = [s[0] for s in self.segments]
        prefix = ", ".join(names[: self.n_prefix]) or "none"
        return (f"frozen prefix: {prefix} ({self.n_prefix}/{len(names)} segments); "
                f"checkpointing: {self.checkpointing}; feature cache: {self.cache is not None}")

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self._prefix_with_taps(x)[0]

    def _prefix_with_taps(self, x: torch.Tensor, taps=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tapped = {}
        with torch.no_grad():
            for name, _, fn in self.segments[: self.n_prefix]:
                x = fn(x)
                if name in taps:
                    tapped[name] = x
        return x, [tapped[t] for t in taps]

    def forward(self, images: torch.Tensor, taps=(), input_size: torch.Tensor | None = None):
        """The image embeddings; with `taps` (segment names, e.g. 'blocks.2') also those segments' raw
        outputs, as `(embeddings, [outputs in taps order])` (semantic heads read them as skip features).
        Taps inside the frozen prefix are cached with the prefix output. `input_size` (B, 2): each item's
        content size; the padding is set to 0 after normalising (`MedSam.normalize`), as the Predictor
        and official SAM feed the ViT."""
        names = [s[0] for s in self.segments]
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise ValueError(f"encoder taps {unknown} are not segments of this encoder ({', '.join(names)})")
        prefix_taps = [t for t in taps if names.index(t) < self.n_prefix]
        x, pt = None, []
        keys = FeatureCache.keys(images) if self.cache is not None else None
        if keys is not None and input_size is not None:  # the content size decides which pixels count as padding
            keys = [f"{k}:{int(h)}x{int(w)}" for k, (h, w) in zip(keys, input_size.reshape(-1, 2).tolist())]
        if keys is not None:
            cached = self.cache.get(keys)
            if cached is not None:
                x, *pt = cached if isinstance(cached, tuple) else (cached,)
                x, pt = x.to(images.device, torch.float32), [t.to(images.device, torch.float32) for t in pt]
        if x is None:
            x, pt = self._prefix_with_taps(self.model.normalize(images, input_size), prefix_taps)
            if keys is not None:
                self.cache.put(keys, (x, *pt) if prefix_taps else x)
                # Hits and misses must give bit-identical results (exact resume): same rounding, same layout.
                x = x.to(self.cache.dtype).to(torch.float32).contiguous()
                pt = [t.to(self.cache.dtype).to(torch.float32).contiguous() for t in pt]
        tapped = dict(zip(prefix_taps, pt))
        for name, module, fn in self.segments[self.n_prefix:]:
            if self.checkpointing and self.training and _trainable(module) and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(fn, x, use_reentrant=False)
            else:
                x = fn(x)
            if name in taps:
                tapped[name] = x
        if not taps:
            return x
        return x, [tapped[t] for t in taps]


# --- precision -----------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    """Autocast context for bf16/fp16 (fp16 on CPU falls back to bf16, which CPUs support)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = DTYPES[precision]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler only where it is needed: fp16 on CUDA (bf16 has fp32's range)."""
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)


# --- measurement ---------------------------------------------------------------------------------
def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), used as the weights baseline in benchmarks."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return peak_memory_bytes(torch.device("cpu"))
