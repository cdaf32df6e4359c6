"""Tests keep to their tmp folders and find the atlas data where MEDICO_PEFT_MRICRON says."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent
FIXED = re.compile(r"^(/tmp|/var/tmp|/usr/share/mricron)(/|$)|(^|/)(runs|demo_out|benchmarks/work)(/|$)")


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_tests_name_no_fixed_output_paths():
    """String literals in tests name no fixed folder outside tmp_path (/tmp/..., runs/, demo_out, ...)."""
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                for word in node.value.split():
                    if FIXED.search(word.strip("'\",;:()")):
                        bad.append(f"{path.name}:{node.lineno}: {word}")
    assert not bad, "fixed paths in tests (use tmp_path):\n  " + "\n  ".join(bad)


def test_the_guard_sees_a_stray_output(tmp_path):
    before = conftest._snapshot((str(tmp_path),))
    (tmp_path / "runs").mkdir()
    assert conftest._snapshot((str(tmp_path),)) - before == {str(tmp_path / "runs")}


def test_mricron_folder_comes_from_the_environment(tmp_path):
    for name in ("aal.nii.gz", "ch2.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    code = "import conftest; print(conftest.MRICRON, conftest.mricron_available())"
    env = dict(os.environ, MEDICO_PEFT_MRICRON=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path), "True"]
