"""`atomic_path` leaves files with the permissions of a plain open(), not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat

import pytest

from medico_peft.utils.atomic import atomic_path, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_path_gives_0644_under_umask_022(tmp_path, umask_022):
    with atomic_path(tmp_path / "adapter.safetensors") as tmp:
        tmp.write_bytes(b"weights")
    assert stat.S_IMODE((tmp_path / "adapter.safetensors").stat().st_mode) == 0o644
    atomic_write_text(tmp_path / "export.json", "{}")
    assert stat.S_IMODE((tmp_path / "export.json").stat().st_mode) == 0o644


def test_atomic_path_takes_a_mode_and_the_umask_still_applies(tmp_path, umask_022):
    with atomic_path(tmp_path / "private.bin", mode=0o600) as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
    with atomic_path(tmp_path / "group.bin", mode=0o664) as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "group.bin").stat().st_mode) == 0o644


def test_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
