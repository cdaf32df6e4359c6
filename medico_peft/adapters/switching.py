"""Several adapters on one base model, switchable without reloading the base.

Each adapter file is read once and kept as tensors. `activate` swaps tensors in place when the new
adapter has the same structure (same PeftConfig) as the active one; otherwise it removes the PEFT
modules and injects the new config. The decoder and prompt encoder are reset to the base weights
before each switch, so an adapter that did not train the decoder runs with the base decoder.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import AdapterError, MedicoPeftError
from ..tuners import inject, is_injected, peft_state, unload
from .io import apply_tensors, check_base, read_adapter, require_interactive, restore_base_parts, snapshot_base_parts


class AdapterBank:
    def __init__(self, base_model: nn.Module):
        if is_injected(base_model):
            raise AdapterError("AdapterBank needs a base model without adapters")
        self.model = base_model
        self._base_parts = snapshot_base_parts(base_model)
        self._adapters: dict[str, tuple] = {}
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, path: str | os.PathLike, force: bool = False) -> None:
        """Read and check an adapter file (base hash, format version, architecture); activation is separate.

        The base hash is computed now, on the plain model with the bank's base parts (the active adapter,
        if any, is removed for the check and put back).
        """
        if name in self._adapters:
            raise AdapterError(f"adapter name {name!r} is already in the bank; choose another name")
        meta, tensors = read_adapter(path)
        require_interactive(meta, path)
        active = self.active
        if is_injected(self.model):  # hash the base an activation runs on: plain encoder + the bank's base parts
            self.deactivate()
        try:
            check_base(meta, self.model, path, force)
        finally:
            if active is not None:
                self.activate(active)
        self._adapters[name] = (meta["config"], tensors, str(path))

    def activate(self, name: str) -> nn.Module:
        """Make `name` the active adapter; returns the (same) model object."""
        if name not in self._adapters:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters) or 'none'}")
        cfg, tensors, path = self._adapters[name]
        model = self.model
        self._reset_base_parts()
        if not (is_injected(model) and peft_state(model).config == cfg):
            if is_injected(model):
                unload(model)
            inject(model, cfg)
        try:
            apply_tensors(model, tensors, path)
        except MedicoPeftError:
            self.deactivate()
            raise
        self.active = name
        return model

    def deactivate(self) -> nn.Module:
        """Back to the plain base model."""
        if is_injected(self.model):
            unload(self.model)
        self._reset_base_parts()
        self.active = None
        return self.model

    def _reset_base_parts(self) -> None:
        restore_base_parts(self.model, self._base_parts)
