"""Training checkpoints (`latest.pt`, `best.pt`): written atomically, read with `weights_only=True`.

A checkpoint holds only what a resumed run needs: the trainable parameters (the frozen base is
rebuilt from the config), optimiser, scheduler and grad-scaler state, every RNG state (as tensors
and lists, so no pickle of arbitrary objects is ever needed; under DDP each process's, in
`per_rank`), counters, the data position inside the epoch, the history and the config. A kill at any moment leaves either the previous file or the
new one under the final name, never a half-written one.
"""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..utils.atomic import atomic_path

LATEST = "latest.pt"
BEST = "best.pt"
FORMAT = "medico_peft.train_checkpoint"
VERSION = 1
# Test hook: seconds to sleep after the temporary file is written and before it is renamed, so a
# test can kill the process exactly while a checkpoint is being saved.
SAVE_DELAY_ENV = "MEDICO_PEFT_TEST_SAVE_DELAY"
# What a resumed run reads from a checkpoint (the Trainer writes these and more), with their types.
REQUIRED = {"trainable": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict,
            "history": list, "global_step": int, "epoch": int}


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` atomically; a failed write (disk full, ...) leaves the previous file untouched."""
    path = Path(path)
    state = {"format": FORMAT, "version": VERSION, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
            delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
            if delay > 0:
                time.sleep(delay)
    except OSError as exc:
        reason = "disk full (ENOSPC)" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: could not write checkpoint, {reason}; the previous checkpoint was kept") from None
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: training checkpoint not found")
    from ..models.checkpoints import torch_load_checked

    state = torch_load_checked(path, "a medico-peft training checkpoint (latest.pt/best.pt)")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medico-peft training checkpoint (format {FORMAT!r} expected)")
    version = state.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: key 'version' should be an int, got {type(version).__name__}")
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is newer than supported ({VERSION})")
    for key, kind in REQUIRED.items():
        if key not in state:
            raise CheckpointError(f"{path}: training checkpoint key {key!r} is missing (truncated state or "
                                  "another program's file)")
        if not isinstance(state[key], kind):
            raise CheckpointError(f"{path}: training checkpoint key {key!r} should be a {kind.__name__}, "
                                  f"got {type(state[key]).__name__}")
    return state


def load_trainable(model: torch.nn.Module, params: dict, source: str) -> None:
    """Copy saved trainable parameters into `model`; every trainable parameter must be present."""
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(params))
    unknown = sorted(set(params) - set(own))
    if missing or unknown:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unknown[:3]}"
        raise CheckpointError(f"{source}: trainable parameters do not match this model/peft config ({detail})")
    with torch.no_grad():
        for name, value in params.items():
            if own[name].shape != value.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(own[name].shape)}")
            own[name].copy_(value)
