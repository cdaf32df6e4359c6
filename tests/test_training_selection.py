"""Adapter selection by validation, early stopping, LR schedules, and several manifests in one run.

Selection tests script the validation score (a Trainer subclass whose validate() returns a rising then
falling sequence) so that which step is best, and when patience runs out, is known in advance; the
weights that must end up in the adapter are snapshotted by a callback at every step.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from _training_helpers import assert_same_metrics, assert_same_tensors, tiny_cfg
from medico_peft.errors import ConfigError
from medico_peft.training import TrainConfig, Trainer, train
from medico_peft.training import checkpointing as ckpt
from medico_peft.training.trainer import VALIDATIONS_CSV, PlateauSchedule, lr_factor, make_scheduler


def scripted(box: dict[int, float], clicks: dict[int, float]):
    """A Trainer whose validation at optimiser step s scores box[s] / clicks[s] (the model is not run)."""

    class Scripted(Trainer):
        def validate(self):
            return {"val_dice_box": box[self.global_step], "val_dice": clicks[self.global_step]}

    return Scripted


def snapshot_every_step(store: dict):
    from medico_peft.tuners import trainable_state_dict

    def callback(event, state):
        if event == "step":
            store[state.step] = {k: v.detach().clone() for k, v in trainable_state_dict(state.model).items()}

    return callback


def run(cls, out, *overrides, resume=False, callbacks=()):
    cfg = tiny_cfg(out, "train.epochs=4", "train.val_every_steps=1", *overrides)
    with cls.from_config(cfg, resume=resume, callbacks=list(callbacks)) as trainer:
        result = trainer.fit()
        from medico_peft.tuners import trainable_state_dict

        final = {k: v.detach().clone() for k, v in trainable_state_dict(trainer.model).items()}
    return result, final


def test_validation_picks_an_earlier_step_and_early_stopping_fires(tmp_path):
    # 8 synthetic slices, batch 2: 4 steps per epoch, 16 in all; the score rises to step 2, then falls.
    clicks = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.35, 5: 0.60}
    weights: dict[int, dict] = {}
    seen = []
    result, final = run(scripted(clicks, clicks), tmp_path, "train.early_stop_patience=2",
                        callbacks=[snapshot_every_step(weights),
                                   lambda e, s: seen.append((s.step, s.metrics["val_dice"])) if e == "validation"
                                   else None])
    assert seen == [(1, 0.30), (2, 0.50), (3, 0.40), (4, 0.35)]  # stopped before step 5's better score
    assert result.stop_reason.startswith("early stopping: 2 validations without a better clicks score")
    assert result.best_step == 2 and result.best_val_dice == pytest.approx(0.50) and len(result.steps) == 4
    assert [v["best"] for v in result.validations] == [True, True, False, False]
    assert_same_tensors(final, weights[2], "adapter weights vs step 2")  # the selected, not the last, weights
    with pytest.raises(AssertionError):
        assert_same_tensors(final, weights[4], "adapter weights vs the last step")
    best = ckpt.load_checkpoint(tmp_path / ckpt.BEST)
    assert best["global_step"] == 2 and best["best_step"] == 2
    assert_same_tensors(best["trainable"], weights[2], "best.pt")
    rows = (tmp_path / VALIDATIONS_CSV).read_text().splitlines()
    assert rows[0].split(",")[:5] == ["step", "epoch", "val_dice_box", "val_dice", "score"] and len(rows) == 5
    import json

    from safetensors import safe_open

    with safe_open(str(result.adapter_path), "pt") as fh:
        training = json.loads(fh.metadata()["extra"])["training"]
    assert training["best_step"] == 2 and training["select_by"] == "clicks" and training["steps"] == 4


@pytest.mark.parametrize("select_by,best_step", [("clicks", 3), ("box", 2), ("mean", 3)])
def test_select_by_names_the_score_that_picks_the_adapter(tmp_path, select_by, best_step):
    box = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.4}
    clicks = {1: 0.6, 2: 0.5, 3: 0.8, 4: 0.3}  # mean: 0.55, 0.60, 0.70, 0.35
    result, _ = run(scripted(box, clicks), tmp_path, "train.epochs=1", f"train.select_by={select_by}")
    assert result.best_step == best_step and result.stop_reason is None
    want = {"clicks": clicks, "box": box, "mean": {k: (box[k] + clicks[k]) / 2 for k in box}}[select_by]
    assert [v["score"] for v in result.validations] == pytest.approx([want[s] for s in (1, 2, 3, 4)])


def test_min_delta_counts_small_gains_as_no_gain_but_the_best_is_still_the_maximum(tmp_path):
    scores = {1: 0.50, 2: 0.505, 3: 0.51, 4: 0.9}
    result, _ = run(scripted(scores, scores), tmp_path, "train.early_stop_patience=2",
                    "train.early_stop_min_delta=0.01")
    assert len(result.steps) == 3 and result.best_step == 3 and "by more than 0.01" in result.stop_reason


def test_resumed_run_keeps_best_and_patience(tmp_path):
    """Cut at step 6 (one validation without gain counted), resume: it must stop at step 8 with the adapter
    of step 4, as the uninterrupted run does. A resume that forgot best/patience would train on."""
    scores = {2: 0.5, 4: 0.6, 6: 0.55, 8: 0.5, 10: 0.9, 12: 0.95, 14: 0.97, 16: 0.99}
    cls = scripted(scores, scores)
    extra = ["train.val_every_steps=2", "train.early_stop_patience=2", "schedule.kind=plateau",
             "schedule.plateau_patience=0", "memory.cache_dtype=float16"]
    straight, straight_w = run(cls, tmp_path / "a", *extra)
    assert straight.best_step == 4 and len(straight.steps) == 8
    cut, _ = run(cls, tmp_path / "b", *extra, "train.max_steps=6")
    assert len(cut.steps) == 6 and cut.stop_reason is None
    resumed, resumed_w = run(cls, tmp_path / "b", *extra, resume=True)
    assert resumed.resumed_from_step == 6 and resumed.best_step == 4 and resumed.stop_reason == straight.stop_reason
    assert_same_tensors(resumed_w, straight_w, "resumed adapter weights")
    # 6 numeric columns compared per row (step, epoch, val_dice_box, val_dice, score, lr); `best` as text
    assert assert_same_metrics(tmp_path / "b" / VALIDATIONS_CSV, tmp_path / "a" / VALIDATIONS_CSV) == 4 * 6


def test_real_validation_every_n_steps_resumes_identically(tmp_path, capsys):
    from safetensors.torch import load_file

    extra = ["train.epochs=2", "train.val_every_steps=3", "memory.cache_dtype=float16", "train.select_by=mean"]
    a = train(tiny_cfg(tmp_path / "a", *extra))
    assert [v["step"] for v in a.validations] == [3, 6, 8]  # every 3 steps and at the run's end
    # The epoch lines name the latest step validation instead of printing the epoch row's NaN.
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[medico-peft] epoch")]
    assert len(epochs) == 2 and not any("nan" in line for line in epochs), epochs
    first = a.validations[0]
    assert f"latest validation (step 3): val Dice box {first['val_dice_box']:.3f} / +" in epochs[0], epochs
    assert all(0.0 <= v["val_dice_box"] <= 1.0 and 0.0 <= v["val_dice"] <= 1.0 for v in a.validations)
    best = max(a.validations, key=lambda v: v["score"])
    assert a.best_step == best["step"] and a.best_val_dice == pytest.approx(best["score"])
    assert a.history[-1]["val_dice"] == a.validations[-1]["val_dice"]  # the end reuses the step-8 validation
    train(tiny_cfg(tmp_path / "b", *extra, "train.max_steps=4"))
    train(tiny_cfg(tmp_path / "b", *extra), resume=True)
    assert assert_same_metrics(tmp_path / "b" / VALIDATIONS_CSV, tmp_path / "a" / VALIDATIONS_CSV) == 3 * 6
    assert_same_tensors(load_file(tmp_path / "b" / "adapter.safetensors"),
                        load_file(tmp_path / "a" / "adapter.safetensors"), "adapter")


# --- schedules ---------------------------------------------------------------------------------
def _lrs(cfg_overrides, steps, total=100, observe=None):
    cfg = TrainConfig.from_dict({"data": {"synthetic": 4}, "optim": {"lr": 1.0}, **cfg_overrides})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(cfg, opt, total)
    out = []
    for i in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the LR optimiser step i uses
        opt.step()
        sched.step()
        if observe is not None:
            sched.observe(observe[i])
    return out


def test_warmup_cosine_follows_the_documented_curve():
    lrs = _lrs({"schedule": {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "total_steps": 10}}, 13)
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)] + [0.1] * 3
    assert lrs == pytest.approx(want)
    assert lrs[6] == pytest.approx(0.55) and lrs[2] == pytest.approx(1.0)  # half-way, and the top after warmup
    # Without schedule.total_steps the cosine spans the run's length by epochs (the `total` given).
    assert _lrs({"schedule": {"kind": "cosine"}}, 3, total=2) == pytest.approx([1.0, 0.5, 0.0])


def test_time_spanned_cosine_follows_the_clock_after_the_warmup_steps(tmp_path):
    """schedule.span=time: after the warmup steps the factor is the cosine of the share of train.max_minutes the
    run's clock says is used; the trainer's parts share one clock with the scheduler."""
    from medico_peft.training.trainer import RunClock, build_parts

    cfg = TrainConfig.from_dict({"data": {"synthetic": 4}, "optim": {"lr": 1.0}, "train": {"max_minutes": 1.0},
                                 "schedule": {"kind": "cosine", "span": "time", "warmup_steps": 2,
                                              "min_lr_ratio": 0.1}})
    now = [0.0]

    class FakeClock(RunClock):
        def __call__(self):
            return now[0]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(cfg, opt, total_steps=10**6, clock=FakeClock())
    lrs = []
    for seconds in (1, 2, 15, 30, 45, 60, 90):  # the clock when the next step's LR is set
        lrs.append(opt.param_groups[0]["lr"])
        now[0] = seconds
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    cosine = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))  # noqa: E731
    assert lrs == pytest.approx([0.5, 1.0, cosine(2 / 60), cosine(15 / 60), cosine(0.5), cosine(45 / 60), 0.1, 0.1])
    # the trainer's scheduler reads the parts' clock (the one `fit` starts and the time budget reads)
    tiny = tiny_cfg(tmp_path, "train.max_minutes=1", "schedule.kind=cosine", "schedule.span=time",
                    "schedule.warmup_steps=0", "schedule.min_lr_ratio=0", "optim.lr=1")
    parts = build_parts(tiny)
    parts.clock.started -= 30  # half the budget used
    parts.optimizer.step()
    parts.scheduler.step()
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("overrides, message", [
    (["schedule.span=time"], "schedule.span: time: the cosine spans train.max_minutes, which is not set"),
    (["schedule.span=time", "train.max_minutes=2", "schedule.kind=constant"],
     "schedule.span: time: only a cosine follows the clock, not schedule.kind 'constant'"),
    (["schedule.span=time", "train.max_minutes=2", "schedule.total_steps=40"],
     "schedule.span: time: the cosine spans train.max_minutes, not schedule.total_steps=40"),
    (["schedule.span=clock"], "schedule.span: expected one of steps, time"),
])
def test_time_spanned_cosine_is_refused_where_it_means_nothing(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict({"data": {"synthetic": 4}, "schedule": {"kind": "cosine"}}, overrides=overrides)


def test_constant_with_warmup_and_lr_factor_agree():
    assert _lrs({"schedule": {"kind": "constant", "warmup_steps": 3}}, 5) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    cfg = TrainConfig.from_dict({"data": {"synthetic": 4}, "schedule": {"kind": "cosine", "warmup_steps": 1}})
    assert lr_factor(cfg.schedule, 0, 5) == 1.0 and lr_factor(cfg.schedule, 3, 5) == pytest.approx(0.5)


def test_plateau_drops_the_lr_after_patience_validations_and_keeps_the_floor():
    scores = [0.5, 0.4, 0.3, 0.6, 0.2, 0.1, 0.0, -1, -2]
    lrs = _lrs({"schedule": {"kind": "plateau", "warmup_steps": 2, "plateau_factor": 0.5, "plateau_patience": 1,
                             "min_lr_ratio": 0.2}}, 9, observe=scores)
    # warmup 0.5, 1; no gain at 0.4 (1 of patience 1), 0.3 (drop to 0.5); 0.6 is a new best; 0.2, 0.1 drop to
    # 0.25; 0.0, -1 drop to max(0.125, 0.2) = 0.2.
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    again = PlateauSchedule(opt, 2, 0.5, 1, 0.2)
    cfg = TrainConfig.from_dict({"data": {"synthetic": 4}, "schedule": {"kind": "plateau"}})
    assert isinstance(make_scheduler(cfg, opt, 10), PlateauSchedule) and again.get_last_lr() == [0.5]
    from medico_peft.errors import CheckpointError

    with pytest.raises(CheckpointError, match="schedule.kind=plateau: the checkpoint's scheduler state"):
        again.load_state_dict({"factor": 0.5, "best": 0.1, "num_bad_epochs": 0})  # torch's ReduceLROnPlateau keys
    again.load_state_dict({"steps": 5, "scale": 0.25, "best": 0.7, "bad": 1, "base_lrs": [2.0]})
    assert again.get_last_lr() == [0.5] and again.state_dict()["best"] == 0.7


@pytest.mark.parametrize("override,message", [
    ("schedule.warmup_steps=-1", "schedule.warmup_steps: expected an int >= 0"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio: expected a float in [0, 1]"),
    ("schedule.plateau_factor=1", "schedule.plateau_factor: expected a float in (0, 1)"),
    ("schedule.total_steps=0", "schedule.total_steps: expected"),
    ("train.select_by=loss", "train.select_by: expected one of clicks, box, mean"),
    ("train.early_stop_min_delta=-0.1", "train.early_stop_min_delta: expected a float >= 0"),
    ("train.val_every_steps=-2", "train.val_every_steps: expected an int >= 0"),
    ("data.weights=[1,2]", "data.weights: expected 1 non-negative numbers"),
])
def test_recipe_keys_are_validated_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        TrainConfig.from_dict({"data": {"manifest": "m.json"}}, overrides=[override])
    assert message in str(info.value), str(info.value)


# --- several manifests ---------------------------------------------------------------------------
def _slab_shards(root, seed):
    from medico_peft.data.convert import convert
    from medico_peft.data.labels import LabelSelection
    from test_data_synthetic import make_volume, save_nifti

    (root / "i").mkdir(parents=True)
    (root / "l").mkdir()
    image, label = make_volume((40, 48, 24), seed=seed)
    save_nifti(root / "i" / f"subject{seed}.nii.gz", image, (1.0, 1.0, 1.0))
    save_nifti(root / "l" / f"subject{seed}.nii.gz", label, (1.0, 1.0, 1.0))
    return convert([(root / "i" / f"subject{seed}.nii.gz", root / "l" / f"subject{seed}.nii.gz")], root / "shards",
                   size=128, split="slab", slab_fractions=(0.5, 0.2, 0.3), slab_gap=1, min_area=0,
                   labels=LabelSelection(), progress=False)


def test_two_manifests_train_with_weights_and_validate_on_both_val_slabs(tmp_path):
    a, b = _slab_shards(tmp_path / "a", 0), _slab_shards(tmp_path / "b", 1)
    assert a.samples["val"] > 0 and b.samples["val"] > 0
    cfg = tiny_cfg(tmp_path / "run", "data.synthetic=0", f"data.manifest=[{a.manifest_path}, {b.manifest_path}]",
                   "data.weights=[1, 3]", "train.epochs=1", "train.val_every_steps=2", "data.samples_per_epoch=4")
    with Trainer.from_config(cfg) as trainer:
        val = trainer.parts.val_ds.dataset
        assert len(val.manifests) == 2 and len(val) == a.samples["val"] + b.samples["val"]
        assert len(trainer.parts.train_ds.dataset.manifests) == 2
        result = trainer.fit()
    assert [v["step"] for v in result.validations] == [2] and result.adapter_path.is_file()
    with pytest.raises(ConfigError, match="task: semantic trains one label table"):
        TrainConfig.from_dict({"task": "semantic", "data": {"manifest": ["x.json", "y.json"]}})
