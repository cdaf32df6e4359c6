"""`train(cfg)`: interactive PEFT training of a `MedSam`, resumable, single- or multi-process.

Construction and the loop are apart: `build_parts(cfg)` assembles the collaborators (model, encoder,
data, optimiser, scheduler, scaler, logger) into a `TrainingParts`; a `Trainer` runs the loop over
them. The loop's phases are methods a subclass overrides (a semantic-segmentation trainer replaces
`train_step` and `validate` and keeps the loop, checkpoints, resume and stopping):

    fit() → per epoch: on_epoch_start → (train_step × grad_accum → optimizer_step → on_step_end
            → should_stop) … → on_epoch_end (validate, save_checkpoint) → finish (adapter, logs)

Callbacks `(event, state)` get a `TrainerState` (step, epoch, metrics, elapsed seconds, the model,
`request_stop(reason)`) at "epoch_start", "batch" (before each micro-batch), "step" (after each
optimiser step), "validation" (after each validation; `metrics` holds its columns) and "epoch_end".

Validation and selection: every `train.val_every_steps` optimiser steps (else every `train.val_every`
epochs) and at the run's end, `validate()` scores the val split (Dice of the box prompt and after
`train.val_clicks` corrective clicks); `train.select_by` (clicks | box | mean) makes one score of it.
A new best score writes `best.pt` (atomically, beside `latest.pt`); `validations.csv` lists every
validation. `train.early_stop_patience` counts validations in a row whose score does not beat the
best by more than `train.early_stop_min_delta`; a plateau schedule observes the same score. The
run's adapter (`adapter.safetensors`, the file the CLI and the demo load) holds the weights of
`best.pt`, i.e. of the best validation (`TrainResult.best_step`), or the last weights when the run
never validated. Best score, its step, the patience count and the schedule state are in every
checkpoint, so a resumed run selects and stops exactly as an uninterrupted one.

Order of one optimiser step: `grad_accum` micro-batches (each: encode once, interactive loss,
backward: by default one decoder backward per sub-iteration inside the step, then one encoder
backward), gradient clipping, AdamW step, scheduler step. Checkpoints are written only right
after an optimiser step, so the saved data position never splits an accumulation window and a
resumed run replays exactly the same batches, prompts and clicks.

Stopping: `train.max_steps` pauses after that many steps (checkpoint only, as a resumable cut);
`train.max_minutes`, `train.early_stop_patience` and `TrainerState.request_stop` end the run as
at a normal end (validate, checkpoint, adapter from the best validated weights) and log the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError, MedicoPeftError
from . import checkpointing as ckpt
from . import distributed as D
from .config import TrainConfig
from .data_source import build_datasets
from .interactive_step import InteractiveStep, finish_backward, prompt_kind_for, validate_batch
from .logging import RunLogger, TrainProgress, write_metrics_csv
from .memory import DTYPES, FeatureCache, SegmentedEncoder, autocast, grad_scaler, peak_memory_bytes

ADAPTER_NAME = "adapter.safetensors"
VALIDATIONS_CSV = "validations.csv"


class NonFiniteLossError(MedicoPeftError):
    """The loss became NaN or infinite; training stopped, the last checkpoint is left as it was."""


@dataclass
class TrainResult:
    out_dir: Path
    adapter_path: Path | None
    best_val_dice: float | None
    history: list[dict]
    train_seconds: float
    peak_memory_bytes: int
    steps: list[dict] = field(default_factory=list)  # per optimiser step of this process: step, loss, dice
    skipped_samples: int = 0
    stopped_early: bool = False  # ended before train.epochs by early stopping, time budget or a callback
    resumed_from_step: int = 0
    stop_reason: str | None = None  # why it stopped early, as logged
    best_step: int | None = None  # optimiser step whose weights the adapter holds (None: never validated)
    validations: list[dict] = field(default_factory=list)  # every validation: step, epoch, val columns, score


@dataclass
class TrainerState:
    """What a callback sees of a running trainer: a snapshot, plus a way to ask it to stop.

    `metrics` holds the latest optimiser step's row (loss, dice, lr, step_time) and, from
    "epoch_end" on, the latest epoch row's keys; `elapsed_seconds` counts from the start of `fit`.
    """

    event: str
    step: int  # optimiser steps done
    epoch: int  # current epoch (0-based); after "epoch_end" the next one
    metrics: dict[str, Any]
    elapsed_seconds: float
    model: torch.nn.Module = field(repr=False)
    _on_stop: Callable[[str], None] = field(repr=False, default=lambda reason: None)

    def request_stop(self, reason: str) -> None:
        """End the run after the current optimiser step, as at a normal end (validate, checkpoint, adapter)."""
        self._on_stop(reason)


# --- construction ------------------------------------------------------------------------------
def resolve_device(kind: str, info: D.DistInfo) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MedicoPeftError("train.device: cuda requested but no CUDA GPU is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def build_model_for(cfg: TrainConfig):
    from ..models import build_model, load_model
    from ..utils.hashing import sha256_state_dict

    m = cfg.model
    if m.pretrained or m.checkpoint:
        return load_model(m.name, checkpoint=m.checkpoint, img_size=m.img_size)
    model = build_model(m.name, img_size=m.img_size, seed=cfg.train.seed)
    model.base_source = f"random:{model.spec.name}:{model.spec.img_size}:seed{cfg.train.seed}"
    model.base_sha256 = sha256_state_dict(model.state_dict())
    return model


class PlateauSchedule:
    """Linear warmup, then the LR times `factor` each time more than `patience` validations in a row bring
    no better score (higher is better), never below lr·min_lr_ratio. `step()` per optimiser step,
    `observe(score)` per validation; `state_dict` holds plain numbers (checkpoints load with weights_only=True)."""

    def __init__(self, optimizer, warmup: int, factor: float, patience: int, min_ratio: float):
        self.optimizer, self.warmup, self.factor, self.patience, self.min_ratio = \
            optimizer, warmup, factor, patience, min_ratio
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.steps, self.scale, self.best, self.bad = 0, 1.0, -math.inf, 0
        self._apply()

    def _apply(self) -> None:
        warm = (self.steps + 1) / self.warmup if self.warmup and self.steps < self.warmup else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * warm * self.scale

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def observe(self, score: float) -> None:
        if score > self.best:
            self.best, self.bad = score, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            self.scale, self.bad = max(self.scale * self.factor, self.min_ratio), 0
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "scale": self.scale, "best": self.best, "bad": self.bad,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if not all(k in state for k in ("steps", "scale", "best", "bad", "base_lrs")):
            raise CheckpointError("schedule.kind=plateau: the checkpoint's scheduler state was written by another "
                                  "schedule (or torch's ReduceLROnPlateau of older versions); start the run again")
        self.steps, self.scale, self.best, self.bad = state["steps"], state["scale"], state["best"], state["bad"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def lr_factor(schedule, step: int, total_steps: int, time_share: float | None = None) -> float:
    """The LR multiplier of optimiser step `step` (0-based) for cosine / constant (see ScheduleConfig):
    warmup (step+1)/warmup_steps, then 1 (constant) or min_lr_ratio + (1 - min_lr_ratio)·½(1 + cos(π·t)),
    t = (step - warmup) / (total_steps - warmup), or `time_share` (the share of the time budget used, span=time),
    clamped to [0, 1]."""
    s, warmup = schedule, schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if s.kind == "constant":
        return 1.0
    t = (step - warmup) / max(1, total_steps - warmup) if time_share is None else time_share
    t = min(1.0, max(0.0, t))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class RunClock:
    """Seconds since `start()` (the trainer's `fit`): what train.max_minutes and a time-spanned cosine both read."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.started


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int, clock: RunClock | None = None):
    """The `schedule` section as a scheduler stepped once per optimiser step; `total_steps` (the run's
    step count by epochs) is what a cosine spans unless `schedule.total_steps` is set; with `schedule.span=time`
    it spans train.max_minutes on `clock` instead."""
    s = cfg.schedule
    if s.kind == "plateau":
        return PlateauSchedule(optimizer, s.warmup_steps, s.plateau_factor, s.plateau_patience, s.min_lr_ratio)
    total = s.total_steps or total_steps
    if s.span == "time":
        clock = clock if clock is not None else RunClock()
        budget = cfg.train.max_minutes * 60
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(s, step, total, clock() / budget))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(s, step, total))


def build_encoder(cfg: TrainConfig, model) -> SegmentedEncoder:
    """The image encoder with its frozen prefix, activation checkpointing and optional feature cache."""
    mem = cfg.memory
    use_cache = mem.feature_cache == "on" or (mem.feature_cache == "auto" and not cfg.data.augment)
    if use_cache and cfg.data.augment:
        warnings.warn("memory.feature_cache=on with data.augment=true: augmented images rarely repeat, "
                      "so the cache mostly misses", stacklevel=3)
    cache = FeatureCache(DTYPES[mem.cache_dtype], mem.cache_max_gb * 1e9) if use_cache else None
    return SegmentedEncoder(model, mem.frozen_prefix, mem.checkpointing, cache)


def apply_base_dtype(model, name: str) -> list[str]:
    """`train.base_dtype`: store the encoder's frozen Linear/Conv weights in that dtype (after injection)."""
    from ..tuners.base_dtype import base_dtype, cast_frozen_base

    cast = cast_frozen_base(model, base_dtype(name))
    if name != "float32" and not cast:
        warnings.warn(f"train.base_dtype={name}: the image encoder has no frozen Linear/Conv layer (everything "
                      "in it trains), so nothing was cast", stacklevel=3)
    return cast


def wrap_distributed(module: torch.nn.Module, info: D.DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP around the step module when several processes train, else the module itself.

    Box iterations leave the multimask heads unused, and mask feeding is random, hence
    find_unused_parameters. Per-iteration backward: the decoder backwards run inside DDP's forward,
    before DDP arms its hooks, so they only accumulate locally; the one encoder backward after it
    (`rest`, which also touches every trainable parameter) is the synchronised one and all-reduces
    all grads.
    """
    if not info.enabled:
        return module
    ids = [info.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def is_lora_b(name: str) -> bool:
    """A LoRA B matrix (`....lora_B.<adapter>.weight`): what LoRA+ trains with the larger learning rate."""
    return "lora_B" in name.split(".")


def build_optimizer(cfg: TrainConfig, model) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """AdamW over the trainable parameters: one group, or with `train.loraplus_lr_ratio` (LoRA+) two —
    group 0 everything at optim.lr (the logged lr), group 1 the LoRA B matrices at lr × ratio.

    Unlike peft's `create_loraplus_optimizer`, 1-D parameters (biases, norms of a decoder trained fully)
    keep optim.lr and every group keeps optim.weight_decay: LoRA+ is about B alone.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise MedicoPeftError("peft: this configuration leaves no trainable parameter")
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    ratio = cfg.train.loraplus_lr_ratio
    if ratio is None:
        return params, torch.optim.AdamW(params, **kwargs)
    group_b = [p for n, p in named if is_lora_b(n)]
    if not group_b:
        raise ConfigError("train.loraplus_lr_ratio: the model has no trainable LoRA B matrix (leave it unset)")
    others = [p for n, p in named if not is_lora_b(n)]
    groups = [{"params": others, "lr": o.lr}, {"params": group_b, "lr": o.lr * ratio}]
    return params, torch.optim.AdamW(groups, **kwargs)


def eva_batches(cfg: TrainConfig, model, train_ds, device: torch.device):
    """The batches EVA computes layer inputs from: `peft.eva_batches` batches of `train.batch_size` training
    items, in an order seeded by train.seed (no global RNG; the same on every process under DDP)."""
    from ..tuners import peft_state

    n_batches = peft_state(model).config.eva_batches
    bs = cfg.train.batch_size
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    for b in range(n_batches):
        idx = order[b * bs:(b + 1) * bs]
        if not idx:
            return
        batch = _collate([train_ds[i] for i in idx])
        yield batch["image"].to(device), batch["input_size"].to(device)


def initialise_eva(cfg: TrainConfig, model, train_ds, device: torch.device, info: D.DistInfo) -> None:
    """EVA init (peft.init=eva): LoRA A from the principal directions of each layer's inputs on a few
    training batches (tuners/lora/init.py). Runs once, before DDP wraps the model; a resumed run then
    overwrites A with its checkpoint."""
    from ..tuners.lora.init import eva_initialise

    record = eva_initialise(model, eva_batches(cfg, model, train_ds, device))
    if info.is_main:
        print(f"[medico-peft] eva: LoRA A from {record.batches} batches ({record.tokens:,} tokens per layer)",
              flush=True)


@dataclass
class TrainingParts:
    """Everything a `Trainer` runs on, assembled once by `build_parts` (or by a subclass's own builder)."""

    cfg: TrainConfig
    info: D.DistInfo
    device: torch.device
    out_dir: Path
    model: torch.nn.Module
    encoder: SegmentedEncoder
    step_module: torch.nn.Module  # computes a micro-batch's loss (DDP-wrapped when distributed)
    train_ds: Any
    val_ds: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sampler: D.ResumableSampler
    scheduler: Any
    scaler: Any
    clicks: torch.Generator  # click sampling of the interactive step (part of the checkpointed RNG)
    logger: RunLogger
    batches_per_epoch: int
    steps_per_epoch: int
    clock: RunClock = field(default_factory=RunClock)  # the run's clock (time budget, time-spanned cosine)


def build_parts(cfg: TrainConfig, model=None) -> TrainingParts:
    """Assemble the interactive trainer's collaborators (model=None builds it from `cfg.model`).

    The order is fixed (it consumes the seeded global RNG: random base weights, then adapter init).
    """
    from ..tuners import inject, is_injected
    from ..tuners.lora.init import needs_eva

    info = D.setup(cfg.train.device)
    device = resolve_device(cfg.train.device, info)
    torch.manual_seed(cfg.train.seed)
    model = model if model is not None else build_model_for(cfg)
    if not is_injected(model):
        inject(model, cfg.peft_config())
    apply_base_dtype(model, cfg.train.base_dtype)
    model.to(device).train()
    train_ds, val_ds = build_datasets(cfg, model.img_size)
    if needs_eva(model):
        initialise_eva(cfg, model, train_ds, device, info)
    encoder = build_encoder(cfg, model)
    step = InteractiveStep(model, encoder, cfg.loss, cfg.train.sub_iterations, cfg.train.mask_feed_prob,
                           per_iteration_backward=cfg.memory.per_iteration_backward, touch_all_params=info.enabled,
                           click_radius=cfg.train.click_radius, click_sampling=cfg.train.click_sampling)
    step_module = wrap_distributed(step, info, device)
    params, optimizer = build_optimizer(cfg, model)
    sampler = D.ResumableSampler(train_ds, info, shuffle=True, seed=cfg.train.seed)
    batches_per_epoch = math.ceil(sampler.num_samples / cfg.train.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum)
    out_dir = Path(cfg.output.dir)
    clock = RunClock()
    return TrainingParts(
        cfg=cfg, info=info, device=device, out_dir=out_dir, model=model, encoder=encoder, step_module=step_module,
        train_ds=train_ds, val_ds=val_ds, params=params, optimizer=optimizer, sampler=sampler,
        scheduler=make_scheduler(cfg, optimizer, steps_per_epoch * cfg.train.epochs, clock), clock=clock,
        scaler=grad_scaler(cfg.memory.precision, device),
        clicks=torch.Generator().manual_seed(cfg.train.seed * 1000 + info.rank),
        logger=RunLogger(out_dir, info.is_main, cfg.output.tensorboard),
        batches_per_epoch=batches_per_epoch, steps_per_epoch=steps_per_epoch)


RUN_FILES = (ckpt.LATEST, ckpt.BEST, ADAPTER_NAME, "metrics.csv", VALIDATIONS_CSV)  # a started or finished run


def prepare_run_dir(out_dir: str | Path, resume: bool | str = False, overwrite: bool = False) -> bool:
    """The start-of-run check of `output.dir`; returns whether to resume from its `latest.pt`.

    `resume=True` needs `latest.pt`; `resume="auto"` resumes if it exists, else starts. Starting
    into a folder that holds a run (`RUN_FILES`) is refused unless `overwrite`, which removes them
    (a stale `best.pt` would otherwise become the new run's adapter).
    """
    out_dir = Path(out_dir)
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume: expected False, True or 'auto', got {resume!r}")
    if resume and overwrite:
        raise ConfigError("--overwrite starts a new run; it cannot be combined with --resume/--resume-if-possible")
    latest = out_dir / ckpt.LATEST
    if resume is True and not latest.exists():
        raise ConfigError(f"--resume: {out_dir} holds no {ckpt.LATEST} to resume from; run without --resume "
                          "to start, or use --resume-if-possible")
    if resume and latest.exists():
        return True
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"output.dir: {out_dir} holds a started or finished run ({', '.join(found)}); pass "
                          "--resume to continue it, or --overwrite to start again (its checkpoints are removed)")
    if found and int(os.environ.get("RANK", "0")) == 0:
        for name in found:
            (out_dir / name).unlink(missing_ok=True)
    return False


def _collate(items):
    return torch.utils.data.default_collate(items)


def _first_checkpoint_note(out_dir: Path) -> str:
    latest = out_dir / ckpt.LATEST
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint had been written yet"


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(1, len(rows))


# --- the loop ----------------------------------------------------------------------------------
class Trainer:
    """The training loop over `TrainingParts`; each phase is a method a subclass may override.

    Loop state (`epoch`, `global_step`, `history`, ...) is what a checkpoint holds
    (`checkpoint_state` / `load_checkpoint_state`), so a resumed run continues exactly.
    """

    monitor = "val_dice"  # the validate() metric that picks the best weights (higher is better)
    _STATE_KEYS = ("epoch", "batch_in_epoch", "global_step", "micro_step", "best_val", "bad_validations",
                   "best_step", "validations", "history", "skipped", "epoch_rows")
    # Keys added after the first checkpoints were written (an older checkpoint keeps the constructor's value).
    _STATE_OPTIONAL = ("epoch_rows", "best_step", "validations")
    # What differs between processes under DDP: each one's RNG streams (clicks are seeded per rank), its
    # skipped-sample count and its step rows. A multi-process checkpoint holds them for every rank
    # (`per_rank`), and each process resumes from its own.
    _PER_RANK_KEYS = ("skipped", "epoch_rows")

    def __init__(self, parts: TrainingParts, callbacks=None, resume: bool = False):
        self.parts = parts
        self.cfg = parts.cfg
        self.info = parts.info
        self.device = parts.device
        self.out_dir = parts.out_dir
        self.model = parts.model
        self.main = parts.info.is_main
        self.callbacks = list(callbacks or [])

        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.global_step = 0  # optimiser steps
        self.micro_step = 0  # micro-batches overall (drives the point/box alternation)
        self.best_val = -math.inf
        self.best_step: int | None = None  # optimiser step of the best validation (the adapter's weights)
        self.bad_validations = 0  # validations in a row without a gain of early_stop_min_delta over the best
        self.validations: list[dict] = []  # one row per validation: step, epoch, val columns, score, best
        self.history: list[dict] = []
        self.skipped = 0
        self.steps: list[dict] = []
        self.resumed_from = 0
        self.metrics: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self._requested_stop: str | None = None
        self.parts.clock.start()
        self.epoch_rows: list[dict] = []
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # A kill during a save leaves an orphaned temporary file (never the final name): tidy up.
            for stale in self.out_dir.glob(".*.pt.*.tmp"):
                stale.unlink(missing_ok=True)
        if resume:
            self.resume()

    @classmethod
    def build_parts(cls, cfg: TrainConfig, model=None) -> TrainingParts:
        """Override to assemble other collaborators (another step module, datasets)."""
        return build_parts(cfg, model)

    @classmethod
    def from_config(cls, cfg: TrainConfig, model=None, resume: bool | str = False, callbacks=None,
                    overwrite: bool = False) -> "Trainer":
        """`resume` True / "auto" / False and `overwrite`: see `prepare_run_dir` (checked before building)."""
        resume = prepare_run_dir(cfg.output.dir, resume, overwrite)
        return cls(cls.build_parts(cfg, model), callbacks=callbacks, resume=resume)

    # --- callbacks -----------------------------------------------------------------------------
    @property
    def elapsed_seconds(self) -> float:
        return self.parts.clock()

    def view(self, event: str) -> TrainerState:
        return TrainerState(event=event, step=self.global_step, epoch=self.epoch, metrics=dict(self.metrics),
                            elapsed_seconds=self.elapsed_seconds, model=self.model, _on_stop=self.request_stop)

    def request_stop(self, reason: str) -> None:
        """End the run after the current optimiser step (the first request's reason is kept)."""
        if self._requested_stop is None:
            self._requested_stop = str(reason) or "stop requested"

    def emit(self, event: str) -> None:
        if self.callbacks:
            state = self.view(event)
            for callback in self.callbacks:
                callback(event, state)

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        from ..tuners import trainable_state_dict

        p = self.parts
        return {
            "trainable": {k: v.detach().cpu() for k, v in trainable_state_dict(self.model).items()},
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "rng": ckpt.rng_state({"clicks": p.clicks}),
            **{key: getattr(self, key) for key in self._STATE_KEYS},
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
        }

    def rank_state(self) -> dict:
        """This process's own part of the loop state (see `_PER_RANK_KEYS`)."""
        return {"rng": ckpt.rng_state({"clicks": self.parts.clicks}),
                **{key: getattr(self, key) for key in self._PER_RANK_KEYS}}

    def load_checkpoint_state(self, state: dict, path: Path) -> None:
        p = self.parts
        ckpt.load_trainable(self.model, state["trainable"], str(path))
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.scaler.load_state_dict(state["scaler"])
        if "bad_validations" not in state and "bad_epochs" in state:  # written before validations were counted
            state = {**state, "bad_validations": state["bad_epochs"]}
        for key in self._STATE_KEYS:
            if key in state:
                setattr(self, key, state[key])
            elif key not in self._STATE_OPTIONAL:
                raise CheckpointError(f"{path}: training checkpoint key {key!r} is missing")
        own = state.get("per_rank", [state])[self.info.rank] if self.info.enabled else state
        ckpt.restore_rng_state(own["rng"], {"clicks": p.clicks})
        for key in self._PER_RANK_KEYS:
            if key in own:
                setattr(self, key, own[key])

    def save_checkpoint(self, best: bool = False) -> None:
        """latest.pt (and best.pt first when `best`). The order matters for a kill between the two writes:
        latest.pt saying "this epoch was the best" while best.pt still held older weights would make a
        resumed run's adapter come from the wrong epoch. With best.pt first, a kill in between leaves
        latest.pt behind best.pt, and the resumed run replays to the same point and writes best.pt again."""
        per_rank = D.all_gather_objects(self.rank_state(), self.info) if self.info.enabled else None
        if self.main:
            state = self.checkpoint_state()
            if per_rank is not None:
                state["per_rank"] = per_rank
            if best:
                ckpt.save_checkpoint(self.out_dir / ckpt.BEST, state)
            ckpt.save_checkpoint(self.out_dir / ckpt.LATEST, state)
        D.barrier(self.info)

    def resume(self) -> None:
        path = self.out_dir / ckpt.LATEST
        if not path.exists():
            warnings.warn(f"--resume: {path} does not exist yet; starting from the beginning", stacklevel=2)
            return
        state = ckpt.load_checkpoint(path)
        if state.get("world_size", 1) != self.info.world_size:
            raise CheckpointError(f"{path}: written by {state.get('world_size')} processes, resuming with "
                                  f"{self.info.world_size}; the data position would not match")
        self.load_checkpoint_state(state, path)
        self.resumed_from = self.global_step

    # --- one step ------------------------------------------------------------------------------
    def scale_fn(self, accum: int):
        """What is back-propagated for a loss: averaged over the accumulation window, AMP-scaled."""
        return lambda loss: self.parts.scaler.scale(loss / accum)

    def check_finite(self, loss: torch.Tensor) -> None:
        bad = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
        if D.all_reduce_sum([bad], self.info, self.device)[0] > 0:
            raise NonFiniteLossError(
                f"training stopped at epoch {self.epoch}, step {self.global_step}: the loss is {loss.item()} "
                f"(not finite); {_first_checkpoint_note(self.out_dir)}. Lower optim.lr, keep optim.grad_clip > 0 "
                f"or use memory.precision=fp32, then rerun with --resume")

    def train_step(self, batch: dict) -> dict[str, float]:
        """Forward and backward of one micro-batch (the loss scaled by 1/grad_accum); returns its metrics.

        Every returned value is averaged over the accumulation window into the step's row.
        """
        cfg = self.cfg
        kind = prompt_kind_for(self.micro_step, cfg.train.prompt)
        images = batch["image"].to(self.device, non_blocking=True)
        scale = self.scale_fn(cfg.train.grad_accum)
        with autocast(cfg.memory.precision, self.device):
            loss, stats = self.parts.step_module(images, batch, kind, self.parts.clicks, scale)
        self.check_finite(loss)
        finish_backward(loss, stats, scale)
        return {"loss": loss.item(), "dice": stats["dice"] if stats["objects"] else 0.0}

    def optimizer_step(self) -> None:
        p = self.parts
        clip = self.cfg.optim.grad_clip
        p.scaler.unscale_(p.optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(p.params, clip)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.scheduler.step()
        self.global_step += 1

    def on_step_end(self, row: dict) -> None:
        """After an optimiser step: record, log, periodic checkpoint."""
        self.steps.append(row)
        self.epoch_rows.append(row)
        self.metrics.update(row)
        self.parts.logger.scalars(self.global_step, row, "train")
        every = self.cfg.output.checkpoint_every_steps
        if every and self.global_step % every == 0:
            self.save_checkpoint()
        self.emit("step")

    def should_stop(self) -> str | None:
        """Why the run should end after this step (time budget, callback request), or None; all ranks agree."""
        reason = self._requested_stop
        budget = self.cfg.train.max_minutes
        if reason is None and budget is not None:
            recent = [r["step_time"] for r in self.steps[-5:]]
            next_step = sum(recent) / len(recent) if recent else 0.0
            elapsed = self.elapsed_seconds
            if elapsed + next_step >= budget * 60:
                reason = (f"time budget train.max_minutes={budget:g} reached after {self.global_step} steps "
                          f"({elapsed:.1f} s elapsed, next step would take ~{next_step:.1f} s)")
        if self.info.enabled and D.all_reduce_sum([0.0 if reason is None else 1.0], self.info, self.device)[0] > 0:
            reason = reason or "stop requested on another process"
        return reason

    # --- one epoch -----------------------------------------------------------------------------
    def make_loader(self, dataset, sampler, batch_size: int, epoch: int):
        g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)  # never touch the global RNG
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                           num_workers=self.cfg.data.num_workers, collate_fn=_collate, generator=g,
                                           persistent_workers=False)

    def on_epoch_start(self) -> None:
        if self.batch_in_epoch == 0:  # a resumed partial epoch keeps the step rows restored from the checkpoint
            self.epoch_rows = []
        self.emit("epoch_start")

    def train_epoch(self, bar: TrainProgress) -> str:
        """One (possibly partial, when resumed) epoch. Returns "done", "max_steps" (paused at
        train.max_steps) or "stop" (`should_stop` gave a reason, kept in `stop_reason`)."""
        cfg, p = self.cfg, self.parts
        accum = cfg.train.grad_accum
        p.sampler.set_position(self.epoch, self.batch_in_epoch * cfg.train.batch_size)
        p.train_ds.set_epoch(self.epoch)
        loader = self.make_loader(p.train_ds, p.sampler, cfg.train.batch_size, self.epoch)
        window: list[dict] = []
        t_step = time.perf_counter()
        for batch in loader:
            self.emit("batch")
            if "skipped" in batch:
                self.skipped += int(batch["skipped"].sum())
            last_in_window = (self.batch_in_epoch + 1) % accum == 0 or self.batch_in_epoch + 1 == p.batches_per_epoch
            sync = contextlib.nullcontext()
            if self.info.enabled and not last_in_window:
                sync = p.step_module.no_sync()
            with sync:
                window.append(self.train_step(batch))
            self.batch_in_epoch += 1
            self.micro_step += 1
            if not last_in_window:
                continue
            self.optimizer_step()
            step_time = time.perf_counter() - t_step
            t_step = time.perf_counter()
            row = {"step": self.global_step, **{k: _mean(window, k) for k in window[0]},
                   "step_time": step_time, "lr": p.optimizer.param_groups[0]["lr"]}
            window = []
            self.on_step_end(row)
            bar.advance(self.global_step, self.elapsed_seconds, row, skipped=self.skipped)
            every = cfg.train.val_every_steps
            if every and self.global_step % every == 0:
                self.save_checkpoint(best=self.validate_and_record(count=True))
                self.stop_reason = self.early_stop_reason()
                if self.stop_reason is not None:
                    return "stop"
            if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                return "max_steps"
            self.stop_reason = self.should_stop()
            if self.stop_reason is not None:
                return "stop"
        return "done"

    def val_loader(self) -> torch.utils.data.DataLoader:
        """This rank's share of the val split (capped by data.max_val_samples), in batches of train.batch_size."""
        p, cfg = self.parts, self.cfg
        n = len(p.val_ds)
        if cfg.data.max_val_samples:
            n = min(n, cfg.data.max_val_samples)
        indices = list(range(self.info.rank, n, self.info.world_size))
        return torch.utils.data.DataLoader(torch.utils.data.Subset(p.val_ds, indices),
                                           batch_size=cfg.train.batch_size, collate_fn=_collate,
                                           num_workers=cfg.data.num_workers)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean Dice over val objects (box, then box + clicks), summed across ranks; NaN without val data."""
        p, cfg = self.parts, self.cfg
        nan = self.empty_validation()
        if p.val_ds is None:
            return nan
        self.model.eval()
        loader = self.val_loader()
        sums = [0.0, 0.0, 0.0]
        for batch in loader:
            with autocast(cfg.memory.precision, self.device):
                box, final = validate_batch(self.model, p.encoder, batch, self.device, cfg.train.val_clicks,
                                            cfg.train.click_radius, cfg.train.click_merge)
            sums[0] += float(box.sum())
            sums[1] += float(final.sum())
            sums[2] += box.numel()
        self.model.train()
        box, final, count = D.all_reduce_sum(sums, self.info, self.device)
        if count == 0:
            return nan
        return {"val_dice_box": box / count, "val_dice": final / count}

    def empty_validation(self) -> dict[str, float]:
        """The validation columns with NaN values (epochs that do not validate, runs without val data)."""
        return {"val_dice_box": math.nan, "val_dice": math.nan}

    def epoch_row(self, val: dict[str, float], seconds: float) -> dict:
        """The epoch's line in history / metrics.csv."""
        rows, p = self.epoch_rows, self.parts
        row = {"epoch": self.epoch, "step": self.global_step}
        if rows:
            keys = [k for k in rows[0] if k not in ("step", "step_time", "lr")]
        else:
            keys = ["loss", "dice"]
        row.update({f"train_{k}": _mean(rows, k) for k in keys})
        row.update(val)
        row.update({
            "lr": p.optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
            "step_seconds": _mean(rows, "step_time"),
            # getrusage's maximum: the whole process's lifetime peak, not this epoch's
            "process_peak_rss_mb": peak_memory_bytes(torch.device("cpu")) / 2**20,
            "skipped_samples": self.skipped,
        })
        if self.device.type == "cuda":
            row["cuda_peak_allocated_mb"] = peak_memory_bytes(self.device) / 2**20
        if p.encoder.cache is not None:
            row["cache_mb"] = p.encoder.cache.bytes / 2**20
        return row

    def on_epoch_end(self, seconds: float, final: bool = False) -> None:
        """Validate (per train.val_every, always at the run's end), record, checkpoint (best too when improved).

        `final` with a partly trained epoch (a stop mid-epoch) records the row as `partial_epoch` and keeps
        the data position, so `--resume` finishes that epoch (and replaces the partial row).
        """
        cfg = self.cfg
        complete = self.batch_in_epoch >= self.parts.batches_per_epoch
        last = self.epoch + 1 == cfg.train.epochs
        val = self.empty_validation()
        improved = False
        if self.validations and self.validations[-1]["step"] == self.global_step:
            val = {k: self.validations[-1][k] for k in val}  # validated at this very step: not again
        elif final or last or (not cfg.train.val_every_steps and (self.epoch + 1) % cfg.train.val_every == 0):
            # A stop mid-epoch (per-epoch validation) does not count patience: a resumed run validates that
            # epoch again. With train.val_every_steps, epochs end without validating except the run's last.
            improved = self.validate_and_record(count=complete or bool(cfg.train.val_every_steps))
            val = {k: self.validations[-1][k] for k in val}
        row = self.epoch_row(val, seconds)
        if self.history and self.history[-1].get("partial_epoch") and self.history[-1]["epoch"] == self.epoch:
            self.history.pop()  # resumed: this epoch's full row replaces the one written at the stop
        if not complete:
            row["partial_epoch"] = True
        self.history.append(row)
        self.metrics.update(row)
        if complete:
            self.epoch += 1
            self.batch_in_epoch = 0
        self.save_checkpoint(best=improved)
        self.parts.logger.epoch(self.history)
        self.log_epoch(row)
        self.emit("epoch_end")

    def score(self, val: dict[str, float]) -> float:
        """The validation score `train.select_by` names (higher is better); `monitor` where the validation
        has no box column (semantic)."""
        keys = {"clicks": (self.monitor,), "box": ("val_dice_box",), "mean": ("val_dice_box", self.monitor)}
        keys = [k for k in keys[self.cfg.train.select_by] if k in val] or [self.monitor]
        return sum(val.get(k, math.nan) for k in keys) / len(keys)

    def validate_and_record(self, count: bool = True) -> bool:
        """Validate, append a `validations` row (and validations.csv), track the best score (its step is
        the adapter's), count early-stopping patience (when `count`) and feed a plateau schedule.
        Returns whether the score is a new best: the caller then writes best.pt."""
        val = self.validate()
        score = self.score(val)
        improved = math.isfinite(score) and score > self.best_val
        if count and math.isfinite(score):
            gained = score > self.best_val + self.cfg.train.early_stop_min_delta
            self.bad_validations = 0 if gained else self.bad_validations + 1
            if isinstance(self.parts.scheduler, PlateauSchedule):
                self.parts.scheduler.observe(score)
        if improved:
            self.best_val, self.best_step = score, self.global_step
        row = {"step": self.global_step, "epoch": self.epoch, **val, "score": score, "best": improved,
               "lr": self.parts.optimizer.param_groups[0]["lr"]}
        self.validations.append(row)
        self.metrics.update(val)
        self.parts.logger.scalars(self.global_step, {**val, "score": score}, "val")
        if self.main:
            write_metrics_csv(self.out_dir / VALIDATIONS_CSV, self.validations)
        self.emit("validation")
        return improved

    def log_epoch(self, row: dict) -> None:
        if not self.main:
            return
        peak = row.get("cuda_peak_allocated_mb", row["process_peak_rss_mb"])
        what = "CUDA peak" if "cuda_peak_allocated_mb" in row else "process peak RSS"
        partial = " (partial)" if row.get("partial_epoch") else ""
        print(f"[medico-peft] epoch {row['epoch']}{partial}: loss {row['train_loss']:.4f}, train Dice "
              f"{row['train_dice']:.3f}, {self.epoch_val_text(row)}, {row['step_seconds']:.2f} s/step, {what} "
              f"{peak:.0f} MiB, skipped samples {self.skipped}", flush=True)

    def epoch_val_text(self, row: dict) -> str:
        """`val_summary` of the epoch's validation; when the run validates every N steps instead (the epoch
        row then holds NaN), that of its latest validation, named by step; 'not validated' when none ran."""
        keys = list(self.empty_validation())
        if not all(math.isnan(row.get(k, math.nan)) for k in keys):
            return self.val_summary(row)
        last = self.validations[-1] if self.validations else None
        if last is None or any(math.isnan(last.get(k, math.nan)) for k in keys):
            return "not validated"
        return f"latest validation (step {last['step']}): " + self.val_summary({**row, **{k: last[k] for k in keys}})

    def val_summary(self, row: dict) -> str:
        """The validation part of the epoch line (a hook: the semantic trainer reports class Dice)."""
        return f"val Dice box {row['val_dice_box']:.3f} / +{self.cfg.train.val_clicks} clicks {row['val_dice']:.3f}"

    def early_stop_reason(self) -> str | None:
        t = self.cfg.train
        if t.early_stop_patience and self.bad_validations >= t.early_stop_patience:
            delta = f" by more than {t.early_stop_min_delta:g}" if t.early_stop_min_delta else ""
            return (f"early stopping: {self.bad_validations} validations without a better {t.select_by} score"
                    f"{delta} (best {self.best_val:.4f} at step {self.best_step})")
        return None

    # --- the run -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.main:
            from ..utils.atomic import atomic_write_text

            atomic_write_text(self.out_dir / "config.yaml", self.cfg.to_yaml())
            print(f"[medico-peft] {self.parts.encoder.describe()}; trainable parameters: "
                  f"{sum(p.numel() for p in self.parts.params):,}; device: {self.device}", flush=True)

    def make_progress(self) -> TrainProgress:
        cfg = self.cfg
        total = self.parts.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        budget = None if cfg.train.max_minutes is None else cfg.train.max_minutes * 60
        return TrainProgress(total, self.global_step, budget, "train", self.main and cfg.output.progress)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.parts.clock.start()
        self.on_train_start()
        bar = self.make_progress()
        try:
            while self.epoch < cfg.train.epochs:
                self.on_epoch_start()
                t_epoch = time.perf_counter()
                outcome = self.train_epoch(bar)
                if outcome == "max_steps":
                    self.save_checkpoint()
                    break
                self.on_epoch_end(time.perf_counter() - t_epoch, final=outcome == "stop")
                if outcome == "stop":
                    break
                self.stop_reason = self.early_stop_reason()
                if self.stop_reason is not None:
                    break
        finally:
            bar.close()
        if self.stop_reason is not None and self.main:
            print(f"[medico-peft] stopped: {self.stop_reason}", flush=True)
        adapter = self.finish() if self.main else None
        D.barrier(self.info)
        return TrainResult(out_dir=self.out_dir, adapter_path=adapter,
                           best_val_dice=None if self.best_val == -math.inf else self.best_val,
                           history=list(self.history), train_seconds=self.elapsed_seconds,
                           peak_memory_bytes=peak_memory_bytes(self.device), steps=self.steps,
                           skipped_samples=self.skipped, stopped_early=self.stop_reason is not None,
                           resumed_from_step=self.resumed_from, stop_reason=self.stop_reason,
                           best_step=self.best_step, validations=list(self.validations))

    def finish(self) -> Path:
        """Adapter from the best validated weights (else the last), plus config.yaml, metrics.csv, curves.png."""
        best = self.out_dir / ckpt.BEST
        if best.exists():
            ckpt.load_trainable(self.model, ckpt.load_checkpoint(best)["trainable"], str(best))
        extra = {"training": {"best_val_dice": None if self.best_val == -math.inf else self.best_val,
                              "select_by": self.cfg.train.select_by, "best_step": self.best_step,
                              "epochs": self.epoch, "steps": self.global_step}}
        if self.stop_reason is not None:
            extra["training"]["stop_reason"] = self.stop_reason
        path = self.write_adapter(self.out_dir / ADAPTER_NAME, extra)
        self.parts.logger.epoch(self.history)
        self.parts.logger.close(self.history)
        return path

    def write_adapter(self, path: Path, extra: dict) -> Path:
        """The run's adapter file (the model holds the weights to save)."""
        from ..adapters import save_adapter

        return save_adapter(self.model, path, extra_metadata=extra)

    def close(self) -> None:
        """Flush TensorBoard (on errors too; curves are drawn by a finished run) and leave the process group."""
        self.parts.logger.close([])
        D.cleanup(self.info)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(cfg: TrainConfig, model=None, resume: bool | str = False, callbacks=None,
          overwrite: bool = False) -> TrainResult:
    """Train per `cfg` (model=None builds it from `cfg.model`); `resume` continues from `output.dir/latest.pt`
    (True: it must exist; "auto": if it exists). A folder holding a run is refused unless `resume` or `overwrite`.

    `callbacks`: functions `(event, state)` with a `TrainerState`, called at "epoch_start", "batch",
    "step" and "epoch_end" (tests, custom hooks; `state.request_stop(reason)` ends the run).
    """
    trainer_cls = Trainer
    if cfg.task == "semantic":
        from .semantic import SemanticTrainer as trainer_cls
    with trainer_cls.from_config(cfg, model=model, resume=resume, callbacks=callbacks, overwrite=overwrite) as trainer:
        return trainer.fit()
