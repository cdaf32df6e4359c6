"""benchmarks/bench_semantic.py without training: the configs it hands the trainer (every variant and data set
validates; variants differ only where the comparison says they do) and the learning-rate schedule over --steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import bench_semantic

    return bench_semantic


def _flat(raw):
    flat = {(section, ""): values for section, values in raw.items() if not isinstance(values, dict)}
    return {**flat, **{(section, key): value for section, values in raw.items() if isinstance(values, dict)
                       for key, value in values.items() if not (section == "output" and key == "dir")}}


def _config(bs, argv, variant, dataset, tmp_path):
    args = bs.parse_args(argv)
    args.variant, args.dataset = variant, dataset
    return bs.variant_config(args, tmp_path / "manifest.json", tmp_path / "run")


def test_variants_differ_only_in_encoder_init_peft_lr_and_checkpointing(bs, tmp_path):
    """The equal-steps claim: every variant trains the same data, steps, batch, schedule and head; the pretrained
    question (lora vs lora_random) differs in model.pretrained alone."""
    from medico_peft.training import TrainConfig

    for dataset in bs.DATASETS:
        configs = {v: _config(bs, ["--steps", "40"], v, dataset, tmp_path) for v in bs.VARIANTS}
        for raw in configs.values():
            TrainConfig.from_dict(raw)  # validates at the edge: a wrong field would raise here
        allowed = {("model", "pretrained"), ("optim", "lr"), ("memory", "checkpointing")}
        for name, raw in configs.items():
            diff = {k for k in set(_flat(raw)) | set(_flat(configs["lora"]))
                    if _flat(raw).get(k) != _flat(configs["lora"]).get(k)}
            assert diff - allowed - {k for k in diff if k[0] == "peft"} == set(), (name, diff)
        random_diff = {k for k in _flat(configs["lora_random"])
                       if _flat(configs["lora_random"])[k] != _flat(configs["lora"]).get(k)}
        assert random_diff == {("model", "pretrained")}
        assert configs["lora"]["data"]["samples_per_epoch"] == 40 * 2
        seeded = _config(bs, ["--steps", "40", "--seed", "1"], "lora", dataset, tmp_path)
        assert {k for k in _flat(seeded) if _flat(seeded)[k] != _flat(configs["lora"])[k]} == {("train", "seed")}
    assert bs.run_dir_of(tmp_path, "mni152", "lora", 0) != bs.run_dir_of(tmp_path, "mni152", "lora", 1)


def test_cosine_spans_exactly_the_step_budget(bs, tmp_path):
    """Default --schedule cosine: warmup over 10 % of --steps, then cosine to 1 % of the LR at the last step,
    as the trainer's own scheduler runs it; --schedule constant keeps the LR flat."""
    import torch

    from medico_peft.training import TrainConfig
    from medico_peft.training.trainer import make_scheduler

    steps = 40
    for schedule in ("cosine", "constant"):
        cfg = TrainConfig.from_dict(_config(bs, ["--steps", str(steps), "--schedule", schedule], "lora",
                                            "mni152", tmp_path))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make_scheduler(cfg, opt, total_steps=10_000)  # the bench's --steps set the span, not this
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        if schedule == "constant":
            assert lrs == pytest.approx([1e-3] * steps)
            continue
        warm = 4  # 10 % of 40
        assert lrs[:warm] == pytest.approx([1e-3 * (i + 1) / warm for i in range(warm)])
        expected_last = 1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (steps - 1 - warm) / (steps - warm))))
        assert lrs[-1] == pytest.approx(expected_last) and lrs[-1] < 0.02e-3
        assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"),
                                           (["--max-test-slices", "-1"], "--max-test-slices")])
def test_bad_arguments_are_refused_by_name(bs, argv, message, capsys):
    with pytest.raises(SystemExit):
        bs.parse_args(argv)
    assert message in capsys.readouterr().err
