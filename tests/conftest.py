"""Shared fixtures. Tests run single-threaded: with 2 threads a busy neighbour core made a 4 ms
forward take 340 ms, so one thread gives steadier and often faster runs here. `make test` runs two
such processes side by side (pytest-xdist, one per core); session fixtures are built once per process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

from medico_peft.data.real_data import MRICRON_DIR  # noqa: E402  (honours MEDICO_PEFT_MRICRON)

MRICRON = str(MRICRON_DIR)


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
    not mricron_available(),
    reason=f"{MRICRON}: no aal.nii.gz / ch2.nii.gz (Debian package mricron-data, which make test installs as root; "
           "or set MEDICO_PEFT_MRICRON to a folder holding them)")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a default output folder (runs/, demo_out/, eval/, shards/ ...) would land. benchmarks/ is left out:
# a benchmark running beside the tests legitimately creates benchmarks/work/ and rewrites results files.
_WATCHED = (_REPO, os.path.join(_REPO, "tests"))
_SCRATCH = {".pytest_cache", "__pycache__", ".hypothesis", ".coverage"}


def _snapshot(folders=_WATCHED) -> set[str]:
    return {os.path.join(f, n) for f in folders if os.path.isdir(f) for n in os.listdir(f) if n not in _SCRATCH}


@pytest.fixture(autouse=True)
def _no_output_outside_tmp():
    """A test writes only under its tmp folder: it fails when it created an entry in the repository root
    or in tests/ (a default output folder such as runs/, demo_out/ or eval/)."""
    before = _snapshot()
    yield
    stray = sorted(_snapshot() - before)
    assert not stray, f"test wrote outside its tmp folder: {', '.join(stray)}"
