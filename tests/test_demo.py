"""A tiny run of the whole demo pipeline: shards → zero-shot eval → budgeted decoder-only and LoRA runs,
each validated on the val slab → eval of both selected adapters → report."""

from __future__ import annotations

import re

import pytest

from medico_peft.cli import main
from medico_peft.workflows.demo import RECIPE_STEPS, decoder_only_config, demo_peft_config, lora_config
from medico_peft.training import TrainConfig


def test_demo_budget_is_the_trainer_option(tmp_path):
    """The wall-clock budget reaches the trainer as train.max_minutes (no callback on private state)."""
    peft = demo_peft_config(rank=4, blocks="2")
    assert peft.blocks == 2 and peft.alpha == 4.0 and peft.targets == ("q", "v")
    cfg = TrainConfig.from_dict(lora_config(tmp_path / "manifest.json", tmp_path / "train", 5e-4, peft, False, 1.5))
    assert cfg.train.max_minutes == 1.5 and cfg.peft_config() == peft
    # the recipe's cosine, spread over the clock's budget (the demo's runs end by time, not by steps)
    assert (cfg.schedule.kind, cfg.schedule.span, cfg.train.max_steps) == ("cosine", "time", None)
    assert cfg.schedule.min_lr_ratio == 0.05 and cfg.schedule.total_steps is None
    stepped = TrainConfig.from_dict(lora_config(tmp_path / "manifest.json", tmp_path / "s", 5e-4, peft, False))
    assert stepped.train.max_steps == RECIPE_STEPS == 160 and stepped.train.max_minutes is None
    assert (stepped.schedule.kind, stepped.schedule.span, stepped.schedule.total_steps) == ("cosine", "steps", 160)
    assert (stepped.schedule.warmup_steps, stepped.schedule.min_lr_ratio) == (8, 0.05)
    # Validation on the val slab picks the adapter (mean of box and click Dice) and can stop the run early.
    t = cfg.train
    assert t.val_every_steps > 0 and t.select_by == "mean" and t.early_stop_patience > 0 and t.val_clicks == 3
    assert cfg.data.max_val_samples and cfg.data.val_split == "val"
    baseline = TrainConfig.from_dict(lora_config(tmp_path / "m.json", tmp_path / "d", 5e-4, decoder_only_config(),
                                                 False, 1.0))
    assert baseline.peft_config().method == "decoder_only" and baseline.train.select_by == "mean"


@pytest.mark.slow
def test_tiny_demo_writes_a_report_with_three_models(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.3", "--max-slices", "2", "--clicks", "1",
                 "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert all(f"[demo] {i}/6" in log for i in range(1, 7))
    report = (out / "report.md").read_text()
    found = {}
    for name in ("zero-shot", "decoder-only", "LoRA"):
        m = re.search(rf"\| \*\*{name}\*\* \| \*\*all\*\* \| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", report)
        assert m, name
        found[name] = [float(v) for v in m.groups()]
    assert all(0.0 <= v <= 1.0 for values in found.values() for v in values)
    assert "| total |" in report and "val = next 15 %" in report
    assert len(re.findall(r"\d+ optimiser steps in .*Stopped: (time budget train\.max_minutes=|early stopping)",
                          report)) == 2
    assert len(re.findall(r"adapter = step \d+\.", report)) == 2  # each run validated and selected a step
    for name in ("dice_before_after.png", "train/adapter.safetensors", "train_decoder/adapter.safetensors",
                 "train/validations.csv", "train_decoder/validations.csv", "train/best.pt",
                 "eval_before/per_object.csv", "eval_decoder/per_object.csv", "eval_after/per_object.csv",
                 "eval_after/overlay_00.png"):
        assert (out / name).stat().st_size > 0, name
    # The same held-out objects were scored for every model.
    rows = lambda d: [line.split(",")[:4] for line in (out / d / "per_object.csv").read_text().splitlines()]  # noqa: E731
    assert rows("eval_before") == rows("eval_after") == rows("eval_decoder")
    # The test slab holds test slices only: none of them was trained or validated on.
    from medico_peft.data.dataset import iter_eval_slices

    manifest = out / "shards" / "manifest.json"
    index = {s: {i["slice_index"] for i in iter_eval_slices(manifest, split=s)} for s in ("train", "val", "test")}
    assert index["val"] and not (index["test"] & (index["train"] | index["val"]))


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
