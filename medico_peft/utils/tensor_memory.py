"""Live tensor bytes by category, measured on any device: what `torch.cuda.max_memory_allocated` would report.

`TensorMemoryTracker` is a `TorchDispatchMode`: every op's outputs are looked at, and each *untyped
storage* is counted once, when it is first seen, and released by a `weakref.finalize` on the storage
object when torch frees it (torch keeps one Python object per live storage, so the finalizer fires
exactly at deallocation). Views, slices, transposes, in-place results and `out=` tensors share their
base's storage, so aliases are never counted twice. Storages that exist before the tracked region
(weights, optimiser state, cached features, inputs) are registered up front with their category.

Categories:
- ``frozen_weights``: parameters without `requires_grad`, and module buffers;
- ``trainable_weights``: parameters with `requires_grad`;
- ``gradients``: a parameter's `.grad` (re-labelled when autograd accumulates into it);
- ``optimizer_state``: tensors in `optimizer.state` (e.g. AdamW's moments and step counters);
- ``cached_features``: tensors registered as a feature cache;
- ``activations``: everything else created inside the region (saved activations, temporaries,
  inputs, activation gradients).

`peak` is the maximum of the total over the region, and `peak_by_category` the breakdown at that
moment. Differences from a device allocator: no rounding to allocator blocks, no fragmentation,
no library workspaces (cuBLAS/cuDNN) or allocations made outside torch's dispatcher.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "cached_features",
              "activations")


class TensorMemoryTracker(TorchDispatchMode):
    """Track live storage bytes per category inside `with tracker:`; read `peak`, `peak_by_category`, `live()`.

    tracker = TensorMemoryTracker()
    tracker.register_model(model); tracker.register_optimizer(optim); tracker.register(cache_tensors, "cached_features")
    with tracker:
        ...one training step...
    tracker.peak, tracker.peak_by_category
    """

    def __init__(self, device: str | torch.device | None = None):
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type
        self._live: dict[int, list] = {}  # id(storage) -> [nbytes, category, finalizer]
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_by_category = dict(self.current)
        self._hooks: list = []

    # --- registration ---------------------------------------------------------------------------
    def register(self, tensors: Iterable[torch.Tensor] | torch.Tensor, category: str) -> None:
        """Count these tensors' storages under `category` (re-labels storages already counted)."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            self._see(t, category, relabel=True)

    def register_model(self, model: torch.nn.Module) -> None:
        """Parameters as frozen/trainable weights, buffers as frozen weights; `.grad`s already present as
        gradients; and from now on every gradient autograd accumulates into a parameter is re-labelled."""
        for p in model.parameters():
            self._see(p, "trainable_weights" if p.requires_grad else "frozen_weights", relabel=True)
            if p.grad is not None:
                self._see(p.grad, "gradients", relabel=True)
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook))
        for b in model.buffers():
            self._see(b, "frozen_weights", relabel=True)

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        self.register(tensors, "optimizer_state")

    def _grad_hook(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._see(param.grad, "gradients", relabel=True)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # --- accounting ----------------------------------------------------------------------------
    def live(self) -> dict[str, int]:
        """Live bytes per category now."""
        return dict(self.current)

    @property
    def total(self) -> int:
        return sum(self.current.values())

    def _see(self, t, category: str, relabel: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
            return
        if self.device_type is not None and t.device.type != self.device_type:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return
        nbytes = storage.nbytes()
        key = id(storage)
        rec = self._live.get(key)
        if rec is None:
            if nbytes == 0:
                return
            fin = weakref.finalize(storage, self._free, key)
            fin.atexit = False
            self._live[key] = [nbytes, category, fin]
            self.current[category] += nbytes
        else:
            if nbytes != rec[0]:  # resized in place (out= ops)
                self.current[rec[1]] += nbytes - rec[0]
                rec[0] = nbytes
            if relabel and rec[1] != category:
                self.current[rec[1]] -= rec[0]
                self.current[category] += rec[0]
                rec[1] = category
        self._update_peak()

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is not None:
            self.current[rec[1]] -= rec[0]

    def _update_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak:
            self.peak = total
            self.peak_by_category = dict(self.current)

    def reset_peak(self) -> None:
        self.peak = sum(self.current.values())
        self.peak_by_category = dict(self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._see(t, "activations")
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._update_peak()
        return result


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
