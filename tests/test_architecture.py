"""Import-layer contracts ([tool.importlinter] in pyproject.toml), checked by pytest as well as `make test`.

import-linter walks `medico_peft/` on disk, where the top-level `export/` folder (installed as
`medico_peft.export` through setuptools' package-dir) is absent, so the check runs over a scratch mirror
whose `medico_peft/` links every entry of the real package plus `export -> export/` (as the Makefile does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the `test` extra")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _mirror(tmp: Path, export_target: Path) -> Path:
    pkg = tmp / "medico_peft"
    pkg.mkdir()
    for entry in (ROOT / "medico_peft").iterdir():
        if entry.name not in ("export", "__pycache__"):
            (pkg / entry.name).symlink_to(entry)
    (pkg / "export").symlink_to(export_target)
    return tmp


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--config", str(PYPROJECT)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_layers_hold(tmp_path):
    res = _lint(_mirror(tmp_path, ROOT / "export"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_contract_catches_runtime_importing_export(tmp_path):
    """A back-edge (runtime -> export) must break both contracts, so the check above is not vacuous."""
    runtime = tmp_path / "src" / "runtime"
    runtime.mkdir(parents=True)
    for entry in (ROOT / "medico_peft" / "runtime").glob("*.py"):
        (runtime / entry.name).symlink_to(entry)
    (runtime / "zz_back_edge.py").write_text("from ..export import sidecar  # noqa: F401\n")
    work = tmp_path / "work"
    work.mkdir()
    pkg = _mirror(work, ROOT / "export") / "medico_peft"
    (pkg / "runtime").unlink()
    (pkg / "runtime").symlink_to(runtime)
    res = _lint(work)
    assert res.returncode != 0
    assert "2 broken" in res.stdout, res.stdout + res.stderr
    assert "medico_peft.runtime.zz_back_edge -> medico_peft.export.sidecar" in res.stdout
