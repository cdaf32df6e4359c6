"""Training: interactive (point/box + corrective clicks) PEFT training of SAM with memory modes and exact resume.

    from medico_peft.training import TrainConfig, train
    cfg = TrainConfig.from_yaml("configs/litemedsam_lora.yaml", overrides=["optim.lr=3e-4"])
    result = train(cfg)          # TrainResult: out_dir, adapter_path, best_val_dice, history, ...

A custom trainer subclasses `Trainer` (override `train_step`, `validate`, `build_parts`, ...) and runs
`with MyTrainer.from_config(cfg) as t: t.fit()`; callbacks `(event, state)` receive a `TrainerState`.

Heavy modules (torch, peft) load on first use of `train`.
"""

from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "train", "TrainResult", "NonFiniteLossError", "Trainer", "TrainerState", "TrainingParts",
           "build_parts"]
_LAZY = ("train", "TrainResult", "NonFiniteLossError", "Trainer", "TrainerState", "TrainingParts", "build_parts")


def __getattr__(name: str):
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
