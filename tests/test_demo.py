"""A tiny run of the whole demo pipeline: shards → zero-shot eval → budgeted LoRA → eval → report."""

from __future__ import annotations

import re

import pytest

from medico_peft.cli import main
from medico_peft.commands.demo import time_budget


class _FakeRun:
    def __init__(self, step_time):
        self.steps = [{"step_time": step_time}]
        self.global_step = 7
        self.cfg = type("C", (), {"train": type("T", (), {"max_steps": None})()})()


def test_time_budget_stops_when_the_next_step_would_overrun():
    roomy, tight = _FakeRun(0.001), _FakeRun(1e6)
    callback = time_budget(60.0)
    callback("batch", roomy)
    assert roomy.cfg.train.max_steps is None  # plenty of time left: keep going
    callback("epoch_start", tight)
    assert tight.cfg.train.max_steps is None  # only batches are checked
    callback("batch", tight)
    assert tight.cfg.train.max_steps == 8  # finish the current step, then stop


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
    for name in ("dice_before_after.png", "training_curve.png", "train/adapter.safetensors",
                 "eval_before/per_object.csv", "eval_after/per_object.csv", "eval_after/overlay_00.png"):
        assert (out / name).stat().st_size > 0, name
    # The same held-out objects were scored before and after.
    rows = lambda d: [line.split(",")[:4] for line in (out / d / "per_object.csv").read_text().splitlines()]  # noqa: E731
    assert rows("eval_before") == rows("eval_after")


def test_demo_rejects_a_non_positive_budget(capsys):
    assert main(["demo", "--minutes", "0"]) == 2
    assert "--minutes: 0.0 should be > 0" in capsys.readouterr().err
