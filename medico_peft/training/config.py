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
from ..evaluation.clicks import CLICK_SAMPLINGS
from ..models.click_prompt import CLICK_MERGE, CLICK_MERGES, CLICK_RADIUS
from ..tuners import PeftConfig
from ..utils.config import check_fields, config_error, from_mapping, option


SELECT_BY = ("clicks", "box", "mean")


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


def _parse_manifest(value):
    """None, one manifest path, or a list of them (several subjects / shard sets trained together)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return value[0] if len(value) == 1 else list(value)
    raise config_error("manifest", f"expected a manifest.json path or a non-empty list of them, got {value!r}")


@dataclass
class DataConfig(_Section):
    manifest: str | list | None = option(None, parse=_parse_manifest,
                                         help="a shard set's manifest.json, or a list of them (e.g. the Colin27 "
                                              "and MNI152 subjects): trained together, validated together")
    weights: list[float] | None = option(None, help="with several manifests: sampling weight of each (default: "
                                                    "every slice equally likely)")
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
    click_sampling: str = option("uniform", choices=CLICK_SAMPLINGS,
                                 help="where training's corrective clicks land: uniform = one random positive "
                                      "and one random negative click per sub-iteration, anywhere in their error "
                                      "region; interior = the same, only pixels at least click_radius inside it "
                                      "(the painted disk then lies inside the error it corrects); center = one "
                                      "click per sub-iteration where evaluation puts it (the centre of the deeper "
                                      "error region)")
    click_merge: str = option(CLICK_MERGE, choices=CLICK_MERGES,
                              help="how validation accepts a click's answer, as evaluation and the Predictor do: "
                                   "local = only the change the click asked for, in the regions touching it; "
                                   "none = the decoder's whole answer (models/click_prompt.py merge_click)")
    prompt: str = option("alternate", choices=("alternate", "point", "box"))
    val_every: int = option(1, min=1, help="validate every N epochs (when train.val_every_steps is 0)")
    val_every_steps: int = option(0, min=0, help="validate every N optimiser steps (and at the run's end); "
                                                 "0 = once per train.val_every epochs")
    val_clicks: int = option(3, min=0, help="corrective clicks after the box in validation")
    select_by: str = option("clicks", choices=SELECT_BY,
                            help="validation score that picks the best adapter and drives early stopping and the "
                                 "plateau schedule: clicks (Dice after val_clicks), box (Dice of the box prompt) "
                                 "or mean (the mean of the two)")
    early_stop_patience: int = option(0, min=0, help="stop after this many validations in a row without a score "
                                                     "above the best by more than early_stop_min_delta; 0 = never")
    early_stop_min_delta: float = option(0.0, min=0.0, help="smallest gain over the best validation score that "
                                                            "resets the early-stopping patience")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    base_dtype: str = option("float32", choices=("float32", "bfloat16"),
                             help="storage dtype of the image encoder's frozen Linear/Conv weights: bfloat16 "
                                  "halves them (LoRA/adapter and any trained weights, LayerNorm and BatchNorm "
                                  "stay fp32 and train in fp32); adapters and merged/exported models are fp32 "
                                  "either way")
    loraplus_lr_ratio: float | None = option(None, gt=0,
                                             help="LoRA+: the LoRA B matrices train with optim.lr times this "
                                                  "ratio (the paper suggests 2-16; every other parameter keeps "
                                                  "optim.lr); needs LoRA layers. Default: off (one learning rate)")


@dataclass
class OptimConfig(_Section):
    lr: float = option(1e-4, gt=0)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off


@dataclass
class ScheduleConfig(_Section):
    """LR factor per optimiser step (training/trainer.py `make_scheduler`): linear warmup from lr/warmup_steps
    to lr over `warmup_steps`, then cosine (down to lr·min_lr_ratio at `total_steps`, or at the end of
    train.max_minutes with span=time), constant, or plateau
    (lr·plateau_factor after plateau_patience validations without a better score, not below lr·min_lr_ratio)."""

    kind: str = option("cosine", choices=("cosine", "plateau", "constant"), help="cosine | plateau | constant")
    warmup_steps: int = option(0, min=0, help="steps of linear warmup (every kind)")
    min_lr_ratio: float = option(0.0, min=0.0, max=1.0, help="floor of the LR as a share of optim.lr "
                                                            "(cosine end, plateau floor)")
    total_steps: int | None = option(None, min=1, help="steps the cosine spans (warmup included); default "
                                                       "train.epochs × steps per epoch; set it for runs ended by "
                                                       "train.max_steps or train.max_minutes")
    span: str = option("steps", choices=("steps", "time"),
                       help="what the cosine spans: steps (total_steps, see there) or time (train.max_minutes: "
                            "after the warmup steps the LR follows the share of the time budget used, reaching "
                            "lr·min_lr_ratio when the clock ends the run)")
    plateau_factor: float = option(0.5, gt=0.0, lt=1.0, help="LR multiplier at each plateau")
    plateau_patience: int = option(2, min=0, help="validations without a better score before the LR drops")


@dataclass
class LossConfig(_Section):
    dice: float = 1.0
    iou_mse: float = 1.0
    focal: float = 0.0
    bce: float = 0.0
    focal_gamma: float = 2.0
    click_bce: float = option(0.0, min=0.0,
                              help="weight of a cross-entropy over the pixels within train.click_radius of every "
                                   "click so far (target: the truth there), added to each click round's loss: "
                                   "teaches the decoder to answer where the user clicked")
    click_region: float = option(0.0, min=0.0,
                                 help="weight of a cross-entropy over the connected error region each round's new "
                                      "click landed in (false negatives for a positive click, false positives for a "
                                      "negative one; target: the truth there), added to the next round's loss: "
                                      "teaches the decoder to correct the whole mistake the user clicked into, not "
                                      "only the clicked pixels (what evaluation's local merge accepts)")
    click_keep: float = option(0.0, min=0.0,
                               help="weight of a cross-entropy over the pixels a click round turned wrong (right "
                                    "in the answer the clicks corrected), summed and divided by the size of the "
                                    "error regions the clicks landed in, added to the next round's loss: teaches "
                                    "the decoder to keep the rest of its answer while it corrects the clicked "
                                    "mistake (at loss.click_region's weight a broken pixel costs as much as a "
                                    "clicked one left unfixed)")
    click_region_clicks: str = option("both", choices=("both", "positive", "negative"),
                                      help="which clicks' error regions loss.click_region scores: both, only "
                                           "positive clicks' false negatives, or only negative clicks' false "
                                           "positives (the full weight on negative clicks taught the decoder to "
                                           "erase whole masks: benchmarks/results/clicks_region.md)")


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


TASKS = ("interactive", "semantic")
HEADS = ("unetr", "samed")


def _parse_classes(value):
    """None (every label of the manifest), or a list / comma string of label ids and name globs."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        raise config_error("classes", f"expected a non-empty list of label ids and name patterns (e.g. "
                                      f"[Thalamus_L, 'Caudate*', 5]), or leave it out for every label; got {value!r}")
    return [int(v) if isinstance(v, str) and v.isdigit() else v for v in value]


def _parse_merge(value):
    """{new name or id: [ids / name globs]}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_error("merge", f"expected a mapping new_name: [label ids / name patterns], got {value!r}")
    out = {}
    for key, sources in value.items():
        items = sources if isinstance(sources, (list, tuple)) else [sources]
        if not items or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in items):
            raise config_error(f"merge.{key}", f"expected a non-empty list of label ids / name patterns, got {sources!r}")
        out[key] = list(items)
    return out


def _parse_rename(value):
    """{label id: new name}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_error("rename", f"expected a mapping label_id: new_name, got {value!r}")
    out = {}
    for key, name in value.items():
        if not str(key).isdigit() or not isinstance(name, str) or not name:
            raise config_error("rename", f"expected label_id: name pairs, got {key!r}: {name!r}")
        out[int(key)] = name
    return out


@dataclass
class SemanticConfig(_Section):
    """`task: semantic`: automatic multi-class segmentation with a head on the (PEFT-adapted) encoder."""

    head: str = option("unetr", choices=HEADS, help="unetr (conv decoder on encoder features) | samed "
                                                   "(SAM's mask decoder, one output per class, no prompts)")
    classes: list | None = option(None, parse=_parse_classes,
                                  help="label ids / name patterns of the manifest's label table to segment "
                                       "(default: every label)")
    merge: dict = option(default_factory=dict, parse=_parse_merge,
                         help="new_name: [ids / patterns] merged into one class (as in convert)")
    rename: dict = option(default_factory=dict, parse=_parse_rename, help="label_id: new class name")
    class_weights: list[float] | None = option(None, help="cross-entropy weight per class, background first")
    dice: float = option(1.0, min=0.0, help="weight of the soft Dice loss (foreground classes)")
    ce: float = option(1.0, min=0.0, help="weight of the cross-entropy loss")
    channels: list[int] | None = option(None, help="UNETR decoder widths per level, coarsest first")
    include_empty: bool = option(False, help="also train on slices holding none of the classes")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainLoopConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "loss": LossConfig, "memory": MemoryConfig, "output": OutputConfig,
    "semantic": SemanticConfig,
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
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    task: str = "interactive"  # "semantic": train a class head (the `semantic` section) instead
    source: str | None = None  # file it was read from (for messages); not serialised

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, overrides=None, source: str | None = None) -> "TrainConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {type(data).__name__}")
        data = apply_overrides(data, overrides)
        valid = list(SECTIONS) + ["peft", "task"]
        for key in data:
            if key not in valid:
                raise ConfigError(f"{key}: unknown section; valid sections: {', '.join(valid)}")
        task = data.get("task", "interactive")
        if task not in TASKS:
            raise ConfigError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        if "semantic" in data and task != "semantic":
            raise ConfigError("semantic: this section needs 'task: semantic'")
        kwargs = {name: from_mapping(section, data.get(name), prefix=name) for name, section in SECTIONS.items()}
        peft = data.get("peft") or {"method": "lora"}
        if not isinstance(peft, dict):
            raise ConfigError(f"peft: expected a mapping of keys, got {peft!r}")
        cfg = cls(peft=dict(peft), source=source, task=task, **kwargs)
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
        peft = self.peft_config()
        if self.train.loraplus_lr_ratio is not None and not peft.uses_lora:
            raise config_error("train.loraplus_lr_ratio", f"LoRA+ gives the LoRA B matrices their own learning "
                                                          f"rate; peft.method {peft.method!r} without decoder_lora "
                                                          "has no LoRA layers (leave it unset)")
        if self.train.base_dtype != "float32" and self.task == "semantic":
            raise config_error("train.base_dtype", f"{self.train.base_dtype} is implemented for the interactive "
                                                   "trainer only, not task semantic; use float32")
        if self.train.base_dtype != "float32" and getattr(peft, "init", "default") in ("pissa", "olora"):
            raise config_error("train.base_dtype", f"{self.train.base_dtype} with peft.init {peft.init!r}: that init "
                                                   "leaves a residual in the frozen base, which a bf16 base would round "
                                                   "(the saved adapter would no longer be exact); use float32")
        if self.schedule.span == "time":
            if self.schedule.kind != "cosine":
                raise config_error("schedule.span", f"time: only a cosine follows the clock, not schedule.kind "
                                                    f"{self.schedule.kind!r}")
            if self.train.max_minutes is None:
                raise config_error("schedule.span", "time: the cosine spans train.max_minutes, which is not set")
            if self.schedule.total_steps is not None:
                raise config_error("schedule.span", f"time: the cosine spans train.max_minutes, not "
                                                    f"schedule.total_steps={self.schedule.total_steps} (leave it unset)")
        if self.loss.click_region_clicks != "both" and not self.loss.click_region:
            raise config_error("loss.click_region_clicks", f"{self.loss.click_region_clicks!r} chooses the clicks "
                                                           "loss.click_region scores, but loss.click_region is 0 "
                                                           "(set its weight, or leave this at 'both')")
        if self.data.weights is not None:
            n = len(self.data.manifest) if isinstance(self.data.manifest, list) else 1
            if len(self.data.weights) != n or any(w < 0 for w in self.data.weights) or sum(self.data.weights) <= 0:
                raise config_error("data.weights", f"expected {n} non-negative numbers (one per data.manifest), "
                                                   f"not all 0, got {self.data.weights}")
        if self.task == "semantic":
            if isinstance(self.data.manifest, list):
                raise config_error("data.manifest", "task: semantic trains one label table: give one manifest")
            if self.semantic.dice + self.semantic.ce <= 0:
                raise config_error("semantic.dice", "semantic.dice and semantic.ce are both 0: no loss to train")
            if self.semantic.class_weights is not None and any(w < 0 for w in self.semantic.class_weights):
                raise config_error("semantic.class_weights", f"weights must be >= 0, got {self.semantic.class_weights}")

    def peft_config(self) -> PeftConfig:
        """The tuners' `PeftConfig` for the `peft` section (a ConfigError names `peft.<key>`)."""
        return PeftConfig.from_dict(dict(self.peft), prefix="peft")

    # --- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["peft"] = dict(self.peft)
        keys = ["model", "peft", "data", "train", "optim", "schedule", "loss", "memory", "output"]
        if self.task != "interactive":  # interactive recipes and run folders stay as they were
            out["task"] = self.task
            keys = ["task"] + keys + ["semantic"]
        return {k: out[k] for k in keys}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
