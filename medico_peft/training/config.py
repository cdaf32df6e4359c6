"""Training configuration: nested dataclasses, validated once at the edge.

A recipe is a YAML file with one section per dataclass below; `key.sub=value` overrides from the
command line are applied to the raw dictionary before validation, so a typo in an override gets the
same one-line error as a typo in the file (`optim.lr: expected a float, got 'abc'`).

The `peft` section is handed to `medico_peft.tuners.PeftConfig.from_dict`, which owns its schema.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


def _choice(*values: str, default: str):
    return field(default=default, metadata={"choices": values})


@dataclass
class ModelConfig:
    name: str = "litemedsam"
    checkpoint: str | None = None  # a file; None = the packaged weights (LiteMedSAM) or random (ViT)
    img_size: int | None = None
    pretrained: bool = True  # False: random weights even where real ones exist (tests, benchmarks)


@dataclass
class DataConfig:
    manifest: str | None = None  # path of a shard set's manifest.json
    train_split: str = "train"
    val_split: str = "val"
    synthetic: int = 0  # > 0: use this many generated slices instead of a manifest (smoke tests)
    n_objects: int = 5  # objects sampled per slice (padding objects are masked out of the loss)
    samples_per_epoch: int | None = None
    label_ids: list[int] | None = None
    verify: bool = True  # check shard checksums against the manifest before training
    augment: bool = False  # image augmentation; when on, the frozen-prefix feature cache is disabled
    skip_corrupt: bool = True
    num_workers: int = 0
    max_val_samples: int | None = None


@dataclass
class TrainLoopConfig:
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps (does not change the schedule)
    max_minutes: float | None = None  # wall-clock budget: end (validate, save) once the next step would overrun it
    seed: int = 0
    sub_iterations: int = 8
    mask_feed_prob: float = 0.5
    prompt: str = _choice("alternate", "point", "box", default="alternate")
    val_every: int = 1
    val_clicks: int = 3
    early_stop_patience: int = 0  # epochs without a better val Dice before stopping; 0 = never
    device: str = _choice("auto", "cpu", "cuda", default="auto")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    kind: str = _choice("cosine", "plateau", "constant", default="cosine")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2


@dataclass
class LossConfig:
    dice: float = 1.0
    iou_mse: float = 1.0
    focal: float = 0.0
    bce: float = 0.0
    focal_gamma: float = 2.0


@dataclass
class MemoryConfig:
    precision: str = _choice("fp32", "bf16", "fp16", default="fp32")
    checkpointing: bool = False  # activation checkpointing of the trainable encoder blocks
    frozen_prefix: bool = True  # run encoder blocks before the first trainable one under no_grad
    feature_cache: str = _choice("auto", "on", "off", default="auto")  # auto = on when augment is off
    cache_dtype: str = _choice("float32", "float16", "bfloat16", default="float16")
    cache_max_gb: float = 4.0
    # Back-propagate each sub-iteration's decoder loss at once (graph cut at the image embedding), then
    # the encoder once: same gradients, only one sub-iteration's decoder graph alive. false = one
    # backward of the summed loss (kept for comparison).
    per_iteration_backward: bool = True


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    checkpoint_every_steps: int = 0  # 0 = once per epoch
    tensorboard: bool = True
    progress: bool = True


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainLoopConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "loss": LossConfig, "memory": MemoryConfig, "output": OutputConfig,
}


def _type_name(tp) -> str:
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp`; numbers written as strings (YAML `3e-4`) become floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build_section(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown key; valid keys: {', '.join(fields)}")
        value = _coerce(value, hints[key], f"{prefix}.{key}")
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{prefix}.{key}: expected one of {', '.join(choices)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides) -> dict:
    """Set `section.key=value` items on a raw config dict (YAML syntax for values)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: dict = field(default_factory=lambda: {"method": "lora"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str | None = None  # file it was read from (for messages); not serialised

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, overrides=None, source: str | None = None) -> "TrainConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {type(data).__name__}")
        data = apply_overrides(data, overrides)
        valid = list(SECTIONS) + ["peft"]
        for key in data:
            if key not in valid:
                raise ConfigError(f"{key}: unknown section; valid sections: {', '.join(valid)}")
        kwargs = {name: _build_section(section, data.get(name), name) for name, section in SECTIONS.items()}
        peft = data.get("peft") or {"method": "lora"}
        if not isinstance(peft, dict):
            raise ConfigError(f"peft: expected a mapping of keys, got {peft!r}")
        cfg = cls(peft=dict(peft), source=source, **kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides=None) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        try:
            return cls.from_dict(data, overrides, source=str(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def validate(self) -> None:
        """Value checks beyond types; the peft section is checked by the tuners' own schema."""
        positive = {"train.epochs": self.train.epochs, "train.batch_size": self.train.batch_size,
                    "train.grad_accum": self.train.grad_accum, "train.val_every": self.train.val_every}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: expected a positive int, got {value}")
        if self.train.sub_iterations < 0:
            raise ConfigError(f"train.sub_iterations: expected an int >= 0, got {self.train.sub_iterations}")
        if not 0.0 <= self.train.mask_feed_prob <= 1.0:
            raise ConfigError(f"train.mask_feed_prob: expected a float in [0, 1], got {self.train.mask_feed_prob}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr: expected a positive float, got {self.optim.lr}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas: expected two floats, got {self.optim.betas}")
        if self.data.manifest is None and self.data.synthetic <= 0:
            raise ConfigError("data.manifest: required (path of a manifest.json), or set data.synthetic=N for generated data")
        if "method" not in self.peft:
            raise ConfigError("peft.method: required (lora, dora, adapter, decoder_only or full)")
        self.peft_config()  # validates the section when the tuners are available

    def peft_config(self):
        """The tuners' `PeftConfig` for the `peft` section (a ConfigError names a bad key)."""
        try:
            from ..tuners import PeftConfig
        except ImportError:
            return None
        try:
            return PeftConfig.from_dict(dict(self.peft))
        except ConfigError as exc:
            import re

            msg = str(exc)
            unknown = re.match(r"^peft config: unknown key '([^']+)'(.*)$", msg)
            if unknown:
                msg = f"peft.{unknown.group(1)}: unknown key{unknown.group(2)}"
            raise ConfigError(msg if msg.startswith("peft.") else f"peft.{msg}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"peft: {exc}") from None

    # --- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["peft"] = dict(self.peft)
        return {k: out[k] for k in ("model", "peft", "data", "train", "optim", "schedule", "loss", "memory", "output")}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
