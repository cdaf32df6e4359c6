"""End-to-end training on the tiny recipe: artefacts, exact resume, NaN stop, disk full, corrupt shard, CLI."""

from __future__ import annotations

import errno
import math

import numpy as np
import pytest
import torch

from _training_helpers import TINY, tiny_cfg
from medico_peft.errors import CheckpointError
from medico_peft.training import NonFiniteLossError, train
from medico_peft.training import checkpointing as ckpt


def test_tiny_run_writes_adapter_metrics_curves_and_checkpoints(tmp_path):
    result = train(tiny_cfg(tmp_path, "output.tensorboard=true"))
    out = result.out_dir
    for name in ("adapter.safetensors", "config.yaml", "metrics.csv", "curves.png", "latest.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    assert len(result.history) == 2 and len(result.steps) == 8
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["val_dice"] <= 1 for r in result.history)
    assert result.best_val_dice == max(r["val_dice"] for r in result.history)
    assert result.peak_memory_bytes > 0 and result.train_seconds > 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "train_dice", "val_dice", "step_seconds", "process_peak_rss_mb", "skipped_samples"} <= set(header)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = ckpt.load_checkpoint(out / "latest.pt")  # weights_only=True inside
    assert state["global_step"] == 8 and state["epoch"] == 2 and "rng" in state and "optimizer" in state
    assert all(not k.startswith("image_encoder.blocks.0.attn.qkv.base_layer") for k in state["trainable"])
    # The adapter holds only trained tensors and loads onto a fresh base model.
    from medico_peft.adapters import load_adapter
    from medico_peft.training.trainer import build_model_for

    fresh = build_model_for(tiny_cfg(tmp_path))
    load_adapter(fresh, result.adapter_path)
    best = ckpt.load_checkpoint(out / "best.pt")["trainable"]
    params = dict(fresh.named_parameters())
    for name, value in best.items():
        torch.testing.assert_close(params[name].detach(), value)


def test_resume_continues_the_same_loss_curve(tmp_path):
    """N steps straight == N/2 steps, stop, --resume, the rest: losses equal within 1e-6 (CPU)."""
    extra = ["peft.blocks=2", "train.epochs=2", "output.checkpoint_every_steps=1"]  # prefix + cache in play
    straight = train(tiny_cfg(tmp_path / "a", *extra))
    first = train(tiny_cfg(tmp_path / "b", *extra, "train.max_steps=3"))  # stops mid-epoch 0
    assert [s["step"] for s in first.steps] == [1, 2, 3]
    second = train(tiny_cfg(tmp_path / "b", *extra), resume=True)
    assert second.resumed_from_step == 3
    losses = [s["loss"] for s in first.steps + second.steps]
    expected = [s["loss"] for s in straight.steps]
    assert len(losses) == len(expected) == 8
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-6)
    assert second.history[-1]["val_dice"] == pytest.approx(straight.history[-1]["val_dice"], abs=1e-6)


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import medico_peft.training.interactive_step as step_module

    real = step_module.mask_losses
    calls = {"n": 0}

    def poisoned(logits, target, weights):
        calls["n"] += 1
        out = real(logits, target, weights)
        return out * float("nan") if calls["n"] > 3 * 3 else out  # 3 iterations per step: NaN at step 4

    monkeypatch.setattr(step_module, "mask_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan .*latest\.pt"):
        train(tiny_cfg(tmp_path, "output.checkpoint_every_steps=1"))
    state = ckpt.load_checkpoint(tmp_path / "latest.pt")
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"latest\.pt: could not write checkpoint, disk full \(ENOSPC\); "
                                              r"the previous checkpoint was kept"):
        train(tiny_cfg(tmp_path, "output.checkpoint_every_steps=1"))
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["global_step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_shard_mid_run_is_skipped_counted_and_logged(tmp_path):
    """A real shard set; a chunk goes bad on disk after epoch 0. New DataLoader workers reopen the file,
    hit the bad sample, skip it, and the trainer counts it; the run finishes."""
    import h5py

    from medico_peft.data.convert import convert
    from test_data_synthetic import make_volume

    image, label = make_volume((30, 30, 10))
    np.save(tmp_path / "v.npy", image)
    np.save(tmp_path / "v_seg.npy", label)
    report = convert([(tmp_path / "v.npy", tmp_path / "v_seg.npy")], tmp_path / "shards", size=128, split="train",
                     progress=False)
    shard = next((tmp_path / "shards").glob("train-*.h5"))

    def corrupt_after_first_epoch(event, run):
        if event == "epoch_start" and run.epoch == 1:
            with h5py.File(shard, "r") as f:
                info = f["images"].id.get_chunk_info(0)
            with open(shard, "r+b") as fh:
                fh.seek(info.byte_offset + 2)
                fh.write(b"\xff" * max(1, info.size - 4))

    cfg = tiny_cfg(tmp_path / "run", "data.synthetic=0", f"data.manifest={report.manifest_path}",
                   "data.num_workers=1", "data.val_split=train", "data.max_val_samples=2", "train.epochs=2")
    result = train(cfg, callbacks=[corrupt_after_first_epoch])
    assert result.history[0]["skipped_samples"] == 0
    assert result.skipped_samples >= 1 and result.history[1]["skipped_samples"] == result.skipped_samples
    assert "skipped_samples" in (tmp_path / "run" / "metrics.csv").read_text()
    assert result.adapter_path.is_file()


def test_cli_train_and_resume_of_finished_run(tmp_path, capsys):
    from medico_peft.cli import main

    args = ["train", "--config", str(TINY), f"output.dir={tmp_path}", "output.progress=false", "train.epochs=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "adapter:" in out and "best val Dice:" in out and "skipped samples: 0" in out
    assert main(args + ["--resume"]) == 0  # nothing left to do: writes the adapter again, no error
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["global_step"] == 4


def test_per_iteration_backward_trains_like_the_single_backward(tmp_path):
    """Same recipe with grad accumulation and the prefix cache: the default per-iteration backward and the
    old single backward of the summed loss give the same loss curve and the same trained weights."""
    extra = ["peft.blocks=2", "train.grad_accum=2", "train.epochs=1"]
    split = train(tiny_cfg(tmp_path / "a", *extra))
    single = train(tiny_cfg(tmp_path / "b", *extra, "memory.per_iteration_backward=false"))
    assert len(split.steps) == len(single.steps) == 2
    np.testing.assert_allclose([s["loss"] for s in split.steps], [s["loss"] for s in single.steps], rtol=0,
                               atol=1e-5)
    a = ckpt.load_checkpoint(tmp_path / "a" / "latest.pt")
    b = ckpt.load_checkpoint(tmp_path / "b" / "latest.pt")
    assert a["config"]["memory"]["per_iteration_backward"] and not b["config"]["memory"]["per_iteration_backward"]
    for name, value in a["trainable"].items():  # AdamW (lr 1e-3) magnifies float-order noise of ~0 grads
        torch.testing.assert_close(value, b["trainable"][name], rtol=1e-4, atol=1e-5)


def test_time_budget_ends_the_run_early_with_a_finished_adapter_and_a_logged_reason(tmp_path, capsys):
    """train.max_minutes: stop once the next step would overrun the budget (at least one step runs), then
    validate, checkpoint and save the adapter as at a normal end; the reason is printed and returned."""
    from medico_peft.adapters import load_adapter
    from medico_peft.training.trainer import build_model_for

    result = train(tiny_cfg(tmp_path, "train.epochs=50", "train.max_minutes=0.0001"))
    assert len(result.steps) == 1 and result.stopped_early
    assert "train.max_minutes=0.0001" in result.stop_reason
    assert f"stopped: {result.stop_reason}" in capsys.readouterr().out
    row = result.history[-1]
    assert len(result.history) == 1 and row["partial_epoch"] and 0 <= row["val_dice"] <= 1
    assert result.best_val_dice == row["val_dice"] and (tmp_path / "best.pt").is_file()
    state = ckpt.load_checkpoint(tmp_path / "latest.pt")
    assert state["global_step"] == 1 and state["epoch"] == 0 and state["batch_in_epoch"] == 1
    fresh = build_model_for(tiny_cfg(tmp_path))
    load_adapter(fresh, result.adapter_path)
    # --resume finishes the partial epoch and replaces its row.
    resumed = train(tiny_cfg(tmp_path, "train.epochs=1"), resume=True)
    assert resumed.resumed_from_step == 1 and len(resumed.steps) == 3
    assert [r["epoch"] for r in resumed.history] == [0] and "partial_epoch" not in resumed.history[0]


def test_callbacks_get_a_public_view_and_can_request_a_stop(tmp_path):
    from medico_peft.training.trainer import TrainerState

    seen = []

    def stop_after_two_steps(event, state):
        assert isinstance(state, TrainerState) and state.event == event
        seen.append((event, state.step, state.epoch))
        if event == "step":
            assert set(state.metrics) >= {"loss", "dice", "lr", "step_time"} and state.elapsed_seconds > 0
            if state.step == 2:
                state.request_stop("enough for this test")

    result = train(tiny_cfg(tmp_path), callbacks=[stop_after_two_steps])
    assert result.stop_reason == "enough for this test" and len(result.steps) == 2
    assert seen[:3] == [("epoch_start", 0, 0), ("batch", 0, 0), ("step", 1, 0)]
    assert seen[-1] == ("epoch_end", 2, 0)


def test_a_subclass_overrides_phases_and_keeps_the_loop(tmp_path):
    """The hook a semantic trainer uses: its own train_step metrics and validate() flow into history,
    best-weight selection and the adapter, with no copy of the loop."""
    from medico_peft.training import Trainer

    class Custom(Trainer):
        def train_step(self, batch):
            return {**super().train_step(batch), "objects": float(batch["image"].shape[0])}

        def validate(self):
            return {"val_dice_box": 0.5, "val_dice": 0.25 + 0.1 * self.epoch}

    with Custom.from_config(tiny_cfg(tmp_path)) as trainer:
        result = trainer.fit()
    assert [r["val_dice"] for r in result.history] == pytest.approx([0.25, 0.35])
    assert all(r["train_objects"] == 2.0 for r in result.history) and result.best_val_dice == pytest.approx(0.35)
    assert result.adapter_path.is_file()


def test_resumed_run_writes_the_same_metrics_and_adapter_as_a_straight_run(tmp_path):
    """Stop mid-epoch, --resume: every non-measured metrics.csv column (the resumed epoch's train_loss and
    train_dice average all of its steps, not just those after the resume) and the adapter tensors match."""
    from safetensors.torch import load_file

    from _training_helpers import assert_same_metrics, assert_same_tensors

    extra = ["train.epochs=2", "memory.cache_dtype=float16", "output.checkpoint_every_steps=3"]
    train(tiny_cfg(tmp_path / "a", *extra))
    train(tiny_cfg(tmp_path / "b", *extra, "train.max_steps=3"))  # stops mid-epoch 0
    train(tiny_cfg(tmp_path / "b", *extra), resume=True)
    assert assert_same_metrics(tmp_path / "b" / "metrics.csv", tmp_path / "a" / "metrics.csv") >= 2 * 6
    assert_same_tensors(load_file(tmp_path / "b" / "adapter.safetensors"),
                        load_file(tmp_path / "a" / "adapter.safetensors"), "adapter")


def test_a_kill_while_best_pt_is_written_keeps_the_best_weights_for_the_adapter(tmp_path, monkeypatch):
    """The process dies inside the first best.pt write (simulated: the save raises a BaseException).
    latest.pt must not already claim that epoch as the best, or the resumed run's adapter would come
    from the last weights instead of the best epoch's."""
    from safetensors.torch import load_file

    from _training_helpers import assert_same_tensors

    class Killed(BaseException):
        pass

    extra = ["train.epochs=2", "memory.cache_dtype=float16", "output.checkpoint_every_steps=3"]
    straight = train(tiny_cfg(tmp_path / "a", *extra))
    assert straight.history[0]["val_dice"] > straight.history[1]["val_dice"]  # epoch 0 stays the best
    real_save = ckpt.save_checkpoint

    def dies_in_best(path, state):
        if path.name == ckpt.BEST:
            with ckpt.atomic_path(path) as tmp:
                tmp.write_bytes(b"half a checkpoint")
                raise Killed
        return real_save(path, state)

    monkeypatch.setattr(ckpt, "save_checkpoint", dies_in_best)
    with pytest.raises(Killed):
        train(tiny_cfg(tmp_path / "b", *extra))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert not (tmp_path / "b" / "best.pt").exists() and (tmp_path / "b" / "latest.pt").exists()
    train(tiny_cfg(tmp_path / "b", *extra), resume=True)
    assert_same_tensors(load_file(tmp_path / "b" / "adapter.safetensors"),
                        load_file(tmp_path / "a" / "adapter.safetensors"), "adapter")
