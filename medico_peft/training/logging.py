"""What a person watches and reads: a tqdm bar, TensorBoard scalars, `metrics.csv` and `curves.png`.

Only rank 0 logs. TensorBoard is the optional `logging` extra: with `output.tensorboard=true` and
no tensorboard installed the run stops with a ConfigError naming the extra (set it false to go without).
`metrics.csv` is rewritten from the full history each epoch (atomically), so a resumed run never
duplicates or loses rows.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..errors import ConfigError
from ..utils.atomic import atomic_write_text


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                unit="it")


class TrainProgress:
    """The training bar: optimiser steps out of the step total, or, with a time budget, elapsed seconds
    out of the budget with the steps done in the postfix (a step total would promise steps, and an
    ETA, that the budget cuts off)."""

    def __init__(self, total_steps: int, initial_step: int, budget_seconds: float | None, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.budget = budget_seconds
        if budget_seconds is None:
            self.bar = progress(total_steps, initial_step, desc, enabled)
        else:
            self.bar = tqdm(total=round(budget_seconds, 1), initial=0, desc=f"{desc} (time budget)",
                            disable=not enabled, dynamic_ncols=True, leave=False,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}")

    def advance(self, step: int, elapsed: float, row: dict, **extra) -> None:
        """After optimiser step `step`, `elapsed` seconds into the run; shows the row's loss and dice."""
        postfix = {}
        if self.budget is None:
            self.bar.update(1)
        else:
            self.bar.update(round(min(elapsed, self.budget), 1) - self.bar.n)
            postfix["steps"] = step
        for key, value in row.items():
            if key not in ("step", "step_time", "lr") and isinstance(value, float):
                postfix[key] = f"{value:.4f}" if key == "loss" else f"{value:.3f}"
        self.bar.set_postfix(ordered_dict={**postfix, **extra})

    def close(self) -> None:
        self.bar.close()


class RunLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.out_dir = out_dir
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            self.writer = _summary_writer(out_dir / "tensorboard")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def epoch(self, history: list[dict]) -> None:
        if not self.enabled or not history:
            return
        self.scalars(int(history[-1].get("step", 0)), history[-1], "epoch")
        if self.writer is not None:
            self.writer.flush()
        write_metrics_csv(self.out_dir / "metrics.csv", history)

    def close(self, history: list[dict]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.enabled and history:
            plot_curves(self.out_dir / "curves.png", history)


def _summary_writer(log_dir: Path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("output.tensorboard: tensorboard is not installed; install the extra "
                          "'medico-peft[logging]' or set output.tensorboard=false")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss and Dice per epoch in one PNG (matplotlib Agg, no display needed)."""
    from ..utils.figures import pyplot, save_png

    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row.get("train_loss", math.nan) for row in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    interactive = any("val_dice_box" in row for row in history)  # semantic runs: mean class Dice instead
    for key, label in (("train_dice", "train Dice"), ("val_dice_box", "val Dice (box)"),
                       ("val_dice", "val Dice (box + clicks)" if interactive else "val Dice (mean over classes)")):
        values = [row.get(key, math.nan) for row in history]
        if any(isinstance(v, float) and math.isfinite(v) for v in values):
            ax_dice.plot(epochs, values, marker="o", label=label)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)
