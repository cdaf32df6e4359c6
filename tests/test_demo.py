"""A tiny run of the whole demo pipeline: shards → zero-shot eval → budgeted LoRA → eval → report."""

from __future__ import annotations

import re

import pytest

from medico_peft.cli import main
from medico_peft.workflows.demo import demo_peft_config, lora_config
from medico_peft.training import TrainConfig


def test_demo_budget_is_the_trainer_option(tmp_path):
    """The wall-clock budget reaches the trainer as train.max_minutes (no callback on private state)."""
    peft = demo_peft_config(rank=4, blocks="2")
    assert peft.blocks == 2 and peft.alpha == 4.0 and peft.targets == ("q", "v")
    cfg = TrainConfig.from_dict(lora_config(tmp_path / "manifest.json", tmp_path / "train", 5e-4, peft, False, 1.5))
    assert cfg.train.max_minutes == 1.5 and cfg.peft_config() == peft


@pytest.mark.slow
def test_tiny_demo_writes_a_report_with_before_and_after_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.3", "--max-slices", "2", "--clicks", "1",
                 "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert all(f"[demo] {i}/5" in log for i in range(1, 6))
    report = (out / "report.md").read_text()
    before = re.search(r"\| \*\*zero-shot\*\* \| \*\*all\*\* \| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", report)
    after = re.search(r"\| \*\*LoRA\*\* \| \*\*all\*\* \| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", report)
    assert before and after
    assert all(0.0 <= float(v) <= 1.0 for v in before.groups() + after.groups())
    assert "MB; LoRA tensors" in report and "| total |" in report
    assert re.search(r"\d+ optimiser steps in .*Stopped: time budget train\.max_minutes=", report)
    for name in ("dice_before_after.png", "training_curve.png", "train/adapter.safetensors",
                 "eval_before/per_object.csv", "eval_after/per_object.csv", "eval_after/overlay_00.png"):
        assert (out / name).stat().st_size > 0, name
    # The same held-out objects were scored before and after.
    rows = lambda d: [line.split(",")[:4] for line in (out / d / "per_object.csv").read_text().splitlines()]  # noqa: E731
    assert rows("eval_before") == rows("eval_after")


def test_demo_rejects_a_non_positive_budget(capsys):
    assert main(["demo", "--minutes", "0"]) == 2
    assert "--minutes: 0.0 should be > 0" in capsys.readouterr().err


def test_demo_report_says_why_training_stopped(tmp_path):
    """report.md names the trainer's own stop reason, or that the epochs ran out (not a fixed sentence)."""
    from types import SimpleNamespace

    from medico_peft.workflows.demo import stop_reason

    cfg = TrainConfig.from_dict(lora_config(tmp_path / "m.json", tmp_path / "t", 5e-4, demo_peft_config(), False, 1))
    budget = "time budget train.max_minutes=1 reached after 7 steps (60.0 s elapsed, next step would take ~9.0 s)"
    assert stop_reason(SimpleNamespace(stop_reason=budget), cfg) == budget
    assert stop_reason(SimpleNamespace(stop_reason=None), cfg) == "all train.epochs=50 epochs done"
