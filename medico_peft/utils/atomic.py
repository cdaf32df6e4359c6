"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A crash, Ctrl-C or full disk therefore never leaves a half-written file under the final name.
The file gets the permissions a plain `open(path, "w")` would give it (0o666 less the umask,
so 0644 under the usual umask 022), not the private 0600 of `tempfile.mkstemp`; pass `mode`
to choose another (the umask still applies, as it does for `os.open`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

DEFAULT_MODE = 0o666  # what open() asks for; the umask takes away the rest


def current_umask() -> int:
    """The process umask (read by setting it and putting it back; there is no read-only call)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "", mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    On success the file gets `mode & ~umask` (default 0o666 & ~umask, like `open`) before the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fchmod(handle.fileno(), mode & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes, mode: int = DEFAULT_MODE) -> None:
    with atomic_path(final, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str, mode: int = DEFAULT_MODE) -> None:
    atomic_write_bytes(final, text.encode("utf-8"), mode=mode)
