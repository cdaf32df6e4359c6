"""Packaging and CLI start-up: every package is listed for the wheel, `export/` installs as
`medico_peft.export` (no generic top-level `export` module), and `--help` stays light."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["tool"]["setuptools"]["packages"])


def test_every_package_on_disk_is_declared():
    on_disk = set()
    for init in (ROOT / "medico_peft").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        on_disk.add(".".join(rel.parts))
    for init in (ROOT / "export").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "export")
        on_disk.add(".".join(("medico_peft", "export") + rel.parts))
    missing = on_disk - _declared_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_export_maps_into_the_package_namespace():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["tool"]["setuptools"]["package-dir"]["medico_peft.export"] == "export"
    assert "export" not in _declared_packages()
    import medico_peft.export

    assert Path(medico_peft.export.__file__).parent == ROOT / "export"


def test_help_is_fast_and_imports_no_heavy_modules():
    code = (
        "import sys, contextlib, io\n"
        "from medico_peft.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'peft', 'onnx', 'onnxruntime', 'h5py', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "print('COMMANDS', out.getvalue().count('\\n'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
