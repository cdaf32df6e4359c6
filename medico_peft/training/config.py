"""Training configuration: nested dataclasses, validated once at the edge.

A recipe is a YAML file with one section per dataclass below; `key.sub=value` overrides from the
command line are applied to the raw dictionary before validation, so a typo in an override gets the
same one-line error as a typo in the file (`optim.lr: expected a float, got 'abc'`).

The `peft` section is handed to `medico_peft.tuners.PeftConfig.from_dict`, which owns its schema.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models.click_prompt import CLICK_RADIUS
from ..tuners import PeftConfig
from ..utils.config import check_fields, config_error, from_mapping, option


class _Section:
    """Every section validates its fields on construction (types, choices, bounds; see utils/config)."""

    def __post_init__(self):
        check_fields(self)


@dataclass
class ModelConfig(_Section):
    name: str = "litemedsam"
    checkpoint: str | None = None  # a file; None = the packaged weights (LiteMedSAM) or random (ViT)
    img_size: int | None = None
    pretrained: bool = True  # False: random weights even where real ones exist (tests, benchmarks)


@dataclass
class DataConfig(_Section):
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
class TrainLoopConfig(_Section):
    epochs: int = option(10, min=1)
    batch_size: int = option(2, min=1)
    grad_accum: int = option(1, min=1)
    max_steps: int | None = None  # stop after this many optimiser steps (does not change the schedule)
    max_minutes: float | None = option(None, gt=0, help="wall-clock budget in minutes: the run ends (validates, "
                                                        "checkpoints, writes the best adapter) once the next step "
                                                        "would overrun it")
    seed: int = 0
    sub_iterations: int = option(8, min=0)
    mask_feed_prob: float = option(0.5, min=0.0, max=1.0)
    click_radius: float = option(CLICK_RADIUS, min=0.0,
                                 help="radius (mask-grid pixels) of the disk each click paints into the fed-back "
                                      "mask prompt (models/click_prompt.py); 0 = clicks as point tokens only. "
                                      "Evaluate and predict with the same radius")
    prompt: str = option("alternate", choices=("alternate", "point", "box"))
    val_every: int = option(1, min=1)
    val_clicks: int = 3
    early_stop_patience: int = 0  # epochs without a better val Dice before stopping; 0 = never
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    base_dtype: str = option("float32", choices=("float32", "bfloat16"),
                             help="storage dtype of the image encoder's frozen Linear/Conv weights: bfloat16 "
                                  "halves them (LoRA/adapter and any trained weights, LayerNorm and BatchNorm "
                                  "stay fp32 and train in fp32); adapters and merged/exported models are fp32 "
                                  "either way")


@dataclass
class OptimConfig(_Section):
    lr: float = option(1e-4, gt=0)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off


@dataclass
class ScheduleConfig(_Section):
    kind: str = option("cosine", choices=("cosine", "plateau", "constant"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2


@dataclass
class LossConfig(_Section):
    dice: float = 1.0
    iou_mse: float = 1.0
    focal: float = 0.0
    bce: float = 0.0
    focal_gamma: float = 2.0


@dataclass
class MemoryConfig(_Section):
    precision: str = option("fp32", choices=("fp32", "bf16", "fp16"))
    checkpointing: bool = False  # activation checkpointing of the trainable encoder blocks
    frozen_prefix: bool = True  # run encoder blocks before the first trainable one under no_grad
    feature_cache: str = option("auto", choices=("auto", "on", "off"))  # auto = on when augment is off
    cache_dtype: str = option("float16", choices=("float32", "float16", "bfloat16"))
    cache_max_gb: float = 4.0
    # Back-propagate each sub-iteration's decoder loss at once (graph cut at the image embedding), then
    # the encoder once: same gradients, only one sub-iteration's decoder graph alive. false = one
    # backward of the summed loss (kept for comparison).
    per_iteration_backward: bool = True


@dataclass
class OutputConfig(_Section):
    dir: str = "runs/default"
    checkpoint_every_steps: int = 0  # 0 = once per epoch
    tensorboard: bool = True
    progress: bool = True


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainLoopConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "loss": LossConfig, "memory": MemoryConfig, "output": OutputConfig,
}


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
        kwargs = {name: from_mapping(section, data.get(name), prefix=name) for name, section in SECTIONS.items()}
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
        """Checks across fields and sections; each field was checked when its section was built."""
        if len(self.optim.betas) != 2:
            raise config_error("optim.betas", f"expected two floats, got {self.optim.betas}")
        if self.data.manifest is None and self.data.synthetic <= 0:
            raise config_error("data.manifest", "required (path of a manifest.json), or set data.synthetic=N "
                                                "for generated data")
        if "method" not in self.peft:
            raise config_error("peft.method", "required (lora, dora, adapter, decoder_only or full)")
        self.peft_config()

    def peft_config(self) -> PeftConfig:
        """The tuners' `PeftConfig` for the `peft` section (a ConfigError names `peft.<key>`)."""
        return PeftConfig.from_dict(dict(self.peft), prefix="peft")

    # --- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["peft"] = dict(self.peft)
        return {k: out[k] for k in ("model", "peft", "data", "train", "optim", "schedule", "loss", "memory", "output")}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
