"""Shared by the training tests: the tiny recipe with a per-test output folder (holds no tests)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def tiny_cfg(out_dir, *overrides):
    from medico_peft.training import TrainConfig

    return TrainConfig.from_yaml(TINY, overrides=[f"output.dir={out_dir}", "output.progress=false", *overrides])
