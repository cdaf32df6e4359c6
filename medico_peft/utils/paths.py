"""Output folders and files a user may care about: refuse to replace them silently; swap finished folders in whole.

`prepare_output_dir` / `prepare_output_file` are the one refusal rule of every command that writes
an output (`--overwrite` to replace; an absent path or an empty folder is fine). `staged_folder`
writes a new folder beside the final one and swaps it in at the end (an atomic exchange where the
system has one), so an interrupted write leaves the previous folder whole and loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError
from .atomic import current_umask


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "--out") -> Path:
    """`path` if it may be written: absent, an empty folder, or `overwrite`. Creates and deletes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} exists and is not a folder")
    if path.is_dir() and not overwrite:
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{what}: folder {path} is not empty ({shown}); pass --overwrite to replace "
                              "its contents, or choose another folder")
    return path


def prepare_output_file(path: str | os.PathLike, overwrite: bool, what: str = "--out") -> Path:
    """`path` if it may be written: absent, or `overwrite` (never a folder). Creates and deletes nothing."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; expected a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{what}: file {path} already exists; pass --overwrite to replace it")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(new: Path, out: Path, owned: Callable[[str], bool] | None = None) -> None:
    """Put the finished folder `new` at `out`; the previous `out` is removed afterwards.

    Entries of the previous folder for which `owned(name)` is False (files the writer does not
    produce, e.g. a user's notes) and that the new folder lacks are moved across, not deleted.
    """
    new, out = Path(new), Path(out)
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        old = trash = new  # the names were exchanged
    else:  # two renames: `out` is missing for an instant, the old folder is never half-replaced
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        old = trash / out.name
        os.rename(out, old)
        os.rename(new, out)
    for entry in sorted(old.iterdir()):
        if owned is not None and not owned(entry.name) and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)
    shutil.rmtree(trash, ignore_errors=True)


def _commit_files(stage: Path, out: Path, owned: Callable[[str], bool] | None) -> None:
    """Fallback for an `out` that cannot be renamed (a mount point): replace its entries one by one.

    The old written entries go first and the `.json` index files (manifest, sidecars) come last,
    so the folder is unloadable for a moment but never describes a half-replaced set.
    """
    for entry in sorted(out.iterdir()):
        if entry != stage and (owned is None or owned(entry.name)):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in sorted(stage.iterdir(), key=lambda p: (p.name.endswith(".json"), p.name)):
        os.replace(entry, out / entry.name)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `out`; if the block succeeds it replaces `out` whole (see `swap_in`).

    If the block fails (or the process dies) `out` is untouched; the staging folder is removed.
    `out` itself a mount point (cannot be renamed): the folder is made inside it, see `_commit_files`.
    """
    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    inside = out.is_dir() and os.path.ismount(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out if inside else out.parent))
    try:
        os.chmod(stage, 0o777 & ~current_umask())  # what mkdir would give, not mkdtemp's 0700
        yield stage
        if inside:
            _commit_files(stage, out, owned)
        else:
            swap_in(stage, out, owned)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
