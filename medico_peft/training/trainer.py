"""`train(cfg)`: interactive PEFT training of a `MedSam`, resumable, single- or multi-process.

Order of one optimiser step: `grad_accum` micro-batches (each: encode once, interactive loss,
backward: by default one decoder backward per sub-iteration inside the step, then one encoder
backward), gradient clipping, AdamW step, scheduler step. Checkpoints are written only right
after an optimiser step, so the saved data position never splits an accumulation window and a
resumed run replays exactly the same batches, prompts and clicks.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, MedicoPeftError
from . import checkpointing as ckpt
from . import distributed as D
from .config import TrainConfig
from .data_source import build_datasets
from .interactive_step import InteractiveStep, finish_backward, prompt_kind_for, validate_batch
from .logging import RunLogger, progress
from .memory import DTYPES, FeatureCache, SegmentedEncoder, autocast, grad_scaler, peak_memory_bytes

ADAPTER_NAME = "adapter.safetensors"


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
    stopped_early: bool = False
    resumed_from_step: int = 0


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


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    s = cfg.schedule
    if s.kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=s.plateau_factor,
                                                          patience=s.plateau_patience)
    warmup = s.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if s.kind == "constant":
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _collate(items):
    return torch.utils.data.default_collate(items)


def _first_checkpoint_note(out_dir: Path) -> str:
    latest = out_dir / ckpt.LATEST
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint had been written yet"


# --- the run -----------------------------------------------------------------------------------
class _Run:
    """State of one training run; methods are the phases of `train`."""

    def __init__(self, cfg: TrainConfig, model, resume: bool, callbacks):
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.info = D.setup(cfg.train.device)
        self.device = resolve_device(cfg.train.device, self.info)
        self.out_dir = Path(cfg.output.dir)
        self.main = self.info.is_main
        torch.manual_seed(cfg.train.seed)

        from ..tuners import inject, is_injected

        self.model = model if model is not None else build_model_for(cfg)
        peft_cfg = cfg.peft_config()
        if not is_injected(self.model):
            inject(self.model, peft_cfg)
        self.model.to(self.device).train()
        self.train_ds, self.val_ds = build_datasets(cfg, self.model.img_size)

        mem = cfg.memory
        use_cache = mem.feature_cache == "on" or (mem.feature_cache == "auto" and not cfg.data.augment)
        if use_cache and cfg.data.augment:
            warnings.warn("memory.feature_cache=on with data.augment=true: augmented images rarely repeat, "
                          "so the cache mostly misses", stacklevel=2)
        cache = FeatureCache(DTYPES[mem.cache_dtype], mem.cache_max_gb * 1e9) if use_cache else None
        self.encoder = SegmentedEncoder(self.model, mem.frozen_prefix, mem.checkpointing, cache)
        step = InteractiveStep(self.model, self.encoder, cfg.loss, cfg.train.sub_iterations,
                               cfg.train.mask_feed_prob, per_iteration_backward=mem.per_iteration_backward,
                               touch_all_params=self.info.enabled)
        self.step_module = step
        if self.info.enabled:
            # Box iterations leave the multimask heads unused, and mask feeding is random.
            # Per-iteration backward: the decoder backwards run inside DDP's forward, before DDP arms its
            # hooks, so they only accumulate locally; the one encoder backward after it (`rest`, which
            # also touches every trainable parameter) is the synchronised one and all-reduces all grads.
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            self.step_module = torch.nn.parallel.DistributedDataParallel(step, device_ids=ids,
                                                                         find_unused_parameters=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise MedicoPeftError("peft: this configuration leaves no trainable parameter")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.sampler = D.ResumableSampler(self.train_ds, self.info, shuffle=True, seed=cfg.train.seed)
        self.batches_per_epoch = math.ceil(self.sampler.num_samples / cfg.train.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch * cfg.train.epochs)
        self.scaler = grad_scaler(mem.precision, self.device)
        self.clicks = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.info.rank)
        self.logger = RunLogger(self.out_dir, self.main, cfg.output.tensorboard)

        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.global_step = 0  # optimiser steps
        self.micro_step = 0  # micro-batches overall (drives the point/box alternation)
        self.best_val = -math.inf
        self.bad_epochs = 0
        self.history: list[dict] = []
        self.skipped = 0
        self.steps: list[dict] = []
        self.resumed_from = 0
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # A kill during a save leaves an orphaned temporary file (never the final name): tidy up.
            for stale in self.out_dir.glob(".*.pt.*.tmp"):
                stale.unlink(missing_ok=True)
        if resume:
            self._resume()

    # --- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        from ..tuners import trainable_state_dict

        return {
            "trainable": {k: v.detach().cpu() for k, v in trainable_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state({"clicks": self.clicks}),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            "micro_step": self.micro_step, "best_val": self.best_val, "bad_epochs": self.bad_epochs,
            "history": self.history, "skipped": self.skipped, "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
        }

    def save(self, best: bool = False) -> None:
        if self.main:
            state = self._state()
            ckpt.save_checkpoint(self.out_dir / ckpt.LATEST, state)
            if best:
                ckpt.save_checkpoint(self.out_dir / ckpt.BEST, state)
        D.barrier(self.info)

    def _resume(self) -> None:
        path = self.out_dir / ckpt.LATEST
        if not path.exists():
            warnings.warn(f"--resume: {path} does not exist yet; starting from the beginning", stacklevel=2)
            return
        state = ckpt.load_checkpoint(path)
        if state.get("world_size", 1) != self.info.world_size:
            raise CheckpointError(f"{path}: written by {state.get('world_size')} processes, resuming with "
                                  f"{self.info.world_size}; the data position would not match")
        ckpt.load_trainable(self.model, state["trainable"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"], {"clicks": self.clicks})
        for key in ("epoch", "batch_in_epoch", "global_step", "micro_step", "best_val", "bad_epochs", "history",
                    "skipped"):
            setattr(self, key, state[key])
        self.resumed_from = self.global_step

    # --- training ------------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        for callback in self.callbacks:
            callback(name, self)

    def _optimizer_step(self) -> None:
        clip = self.cfg.optim.grad_clip
        self.scaler.unscale_(self.optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.global_step += 1

    def _scale_fn(self, accum: int):
        """What is back-propagated for a loss: averaged over the accumulation window, AMP-scaled."""
        return lambda loss: self.scaler.scale(loss / accum)

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
        if D.all_reduce_sum([bad], self.info, self.device)[0] > 0:
            raise NonFiniteLossError(
                f"training stopped at epoch {self.epoch}, step {self.global_step}: the loss is {loss.item()} "
                f"(not finite); {_first_checkpoint_note(self.out_dir)}. Lower optim.lr, keep optim.grad_clip > 0 "
                f"or use memory.precision=fp32, then rerun with --resume")

    def _loader(self, dataset, sampler, batch_size: int, epoch: int):
        g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)  # never touch the global RNG
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                           num_workers=self.cfg.data.num_workers, collate_fn=_collate, generator=g,
                                           persistent_workers=False)

    def train_epoch(self, bar) -> bool:
        """One (possibly partial, when resumed) epoch; returns False when max_steps was reached."""
        cfg = self.cfg
        accum = cfg.train.grad_accum
        self.sampler.set_position(self.epoch, self.batch_in_epoch * cfg.train.batch_size)
        self.train_ds.set_epoch(self.epoch)
        loader = self._loader(self.train_ds, self.sampler, cfg.train.batch_size, self.epoch)
        window_loss, window_dice, window_n = 0.0, 0.0, 0
        t_step = time.perf_counter()
        for batch in loader:
            self._event("batch")
            self.skipped += int(batch["skipped"].sum())
            kind = prompt_kind_for(self.micro_step, cfg.train.prompt)
            last_in_window = (self.batch_in_epoch + 1) % accum == 0 or self.batch_in_epoch + 1 == self.batches_per_epoch
            sync = contextlib.nullcontext()
            if self.info.enabled and not last_in_window:
                sync = self.step_module.no_sync()
            images = batch["image"].to(self.device, non_blocking=True)
            scale = self._scale_fn(accum)
            with sync:
                with autocast(cfg.memory.precision, self.device):
                    loss, stats = self.step_module(images, batch, kind, self.clicks, scale)
                self._check_finite(loss)
                finish_backward(loss, stats, scale)
            self.batch_in_epoch += 1
            self.micro_step += 1
            window_loss += loss.item()
            window_dice += stats["dice"] if stats["objects"] else 0.0
            window_n += 1
            if not last_in_window:
                continue
            self._optimizer_step()
            step_time = time.perf_counter() - t_step
            t_step = time.perf_counter()
            row = {"step": self.global_step, "loss": window_loss / window_n, "dice": window_dice / window_n,
                   "step_time": step_time, "lr": self.optimizer.param_groups[0]["lr"]}
            self.steps.append(row)
            self.logger.scalars(self.global_step, row, "train")
            self.epoch_rows.append(row)
            window_loss, window_dice, window_n = 0.0, 0.0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", dice=f"{row['dice']:.3f}", skipped=self.skipped)
            every = cfg.output.checkpoint_every_steps
            if every and self.global_step % every == 0:
                self.save()
            if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                return False
        return True

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Mean Dice over val objects (box, then box + clicks), summed across ranks."""
        if self.val_ds is None:
            return math.nan, math.nan
        self.model.eval()
        n = len(self.val_ds)
        if self.cfg.data.max_val_samples:
            n = min(n, self.cfg.data.max_val_samples)
        indices = list(range(self.info.rank, n, self.info.world_size))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.val_ds, indices),
                                             batch_size=self.cfg.train.batch_size, collate_fn=_collate,
                                             num_workers=self.cfg.data.num_workers)
        g = torch.Generator().manual_seed(self.cfg.train.seed + 12345)  # same clicks every validation
        sums = [0.0, 0.0, 0.0]
        for batch in loader:
            with autocast(self.cfg.memory.precision, self.device):
                box, final = validate_batch(self.model, self.encoder, batch, self.device, self.cfg.train.val_clicks, g)
            sums[0] += float(box.sum())
            sums[1] += float(final.sum())
            sums[2] += box.numel()
        self.model.train()
        box, final, count = D.all_reduce_sum(sums, self.info, self.device)
        if count == 0:
            return math.nan, math.nan
        return box / count, final / count

    def run(self) -> TrainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.main:
            from ..utils.atomic import atomic_write_text

            atomic_write_text(self.out_dir / "config.yaml", cfg.to_yaml())
            print(f"[medico-peft] {self.encoder.describe()}; trainable parameters: "
                  f"{sum(p.numel() for p in self.params):,}; device: {self.device}", flush=True)
        total = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        bar = progress(total, self.global_step, "train", self.main and cfg.output.progress)
        stopped_early = False
        try:
            while self.epoch < cfg.train.epochs:
                self._event("epoch_start")
                self.epoch_rows: list[dict] = []
                t_epoch = time.perf_counter()
                finished = self.train_epoch(bar)
                if not finished:
                    self.save()
                    break
                stopped_early = self._end_epoch(time.perf_counter() - t_epoch)
                if stopped_early:
                    break
        finally:
            bar.close()
        result_dir = self.out_dir
        adapter = self._finish() if self.main else None
        D.barrier(self.info)
        return TrainResult(out_dir=result_dir, adapter_path=adapter,
                           best_val_dice=None if self.best_val == -math.inf else self.best_val,
                           history=list(self.history), train_seconds=time.perf_counter() - t0,
                           peak_memory_bytes=peak_memory_bytes(self.device), steps=self.steps,
                           skipped_samples=self.skipped, stopped_early=stopped_early,
                           resumed_from_step=self.resumed_from)

    def _end_epoch(self, seconds: float) -> bool:
        cfg = self.cfg
        rows = self.epoch_rows
        val_box, val_final = (math.nan, math.nan)
        if (self.epoch + 1) % cfg.train.val_every == 0 or self.epoch + 1 == cfg.train.epochs:
            val_box, val_final = self.validate()
        row = {
            "epoch": self.epoch, "step": self.global_step,
            "train_loss": sum(r["loss"] for r in rows) / max(1, len(rows)),
            "train_dice": sum(r["dice"] for r in rows) / max(1, len(rows)),
            "val_dice_box": val_box, "val_dice": val_final, "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds, "step_seconds": sum(r["step_time"] for r in rows) / max(1, len(rows)),
            "peak_memory_mb": peak_memory_bytes(self.device) / 2**20, "skipped_samples": self.skipped,
        }
        if self.encoder.cache is not None:
            row["cache_mb"] = self.encoder.cache.bytes / 2**20
        improved = math.isfinite(val_final) and val_final > self.best_val
        if improved:
            self.best_val, self.bad_epochs = val_final, 0
        elif math.isfinite(val_final):
            self.bad_epochs += 1
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and math.isfinite(val_final):
            self.scheduler.step(val_final)
        self.history.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.save(best=improved)
        self.logger.epoch(self.history)
        if self.main:
            print(f"[medico-peft] epoch {row['epoch']}: loss {row['train_loss']:.4f}, train Dice "
                  f"{row['train_dice']:.3f}, val Dice box {val_box:.3f} / +{cfg.train.val_clicks} clicks "
                  f"{val_final:.3f}, {row['step_seconds']:.2f} s/step, peak {row['peak_memory_mb']:.0f} MiB, "
                  f"skipped samples {self.skipped}", flush=True)
        patience = cfg.train.early_stop_patience
        return bool(patience and self.bad_epochs >= patience)

    def _finish(self) -> Path:
        """Adapter from the best validated weights (else the last), plus config.yaml, metrics.csv, curves.png."""
        from ..adapters import save_adapter

        best = self.out_dir / ckpt.BEST
        if best.exists():
            ckpt.load_trainable(self.model, ckpt.load_checkpoint(best)["trainable"], str(best))
        extra = {"training": {"best_val_dice": None if self.best_val == -math.inf else self.best_val,
                              "epochs": self.epoch, "steps": self.global_step}}
        path = save_adapter(self.model, self.out_dir / ADAPTER_NAME, extra_metadata=extra)
        self.logger.epoch(self.history)
        self.logger.close(self.history)
        return path


def train(cfg: TrainConfig, model=None, resume: bool = False, callbacks=None) -> TrainResult:
    """Train per `cfg` (model=None builds it from `cfg.model`); `resume` continues from `output.dir/latest.pt`.

    `callbacks`: functions `(event, run)` called at "epoch_start" and "batch" (tests, custom hooks).
    """
    run = _Run(cfg, model, resume, callbacks)
    try:
        return run.run()
    finally:
        run.logger.close([])  # flushes TensorBoard on errors too; curves are drawn by a finished run
        D.cleanup(run.info)
