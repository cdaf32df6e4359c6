"""Shared fixtures. Tests run single-threaded: with 2 threads a busy neighbour core made a 4 ms
forward take 340 ms, so one thread gives steadier and often faster runs here."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

MRICRON = "/usr/share/mricron/templates"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def litemedsam_path() -> str:
    from medico_peft.models.weights import litemedsam_checkpoint

    return str(litemedsam_checkpoint())


def mricron_available() -> bool:
    return os.path.exists(os.path.join(MRICRON, "aal.nii.gz")) and os.path.exists(os.path.join(MRICRON, "ch2.nii.gz"))


requires_mricron = pytest.mark.skipif(
    not mricron_available(), reason="Debian package mricron-data not installed (make test installs it as root)"
)
