"""Semantic-segmentation training: a class head on the (PEFT-adapted) SAM encoder, from the same shards.

`SemanticTrainer` is a `Trainer` whose parts and two phases differ and nothing else: `build_parts`
(classes from the manifest's label table, a `SemanticSam`, `SemanticStep`), `train_step` (Dice +
cross-entropy) and `validate` (per-class Dice). The loop, memory modes (precision, frozen prefix with
its feature cache, activation checkpointing), checkpoints, exact resume, DDP, stopping and progress
are the interactive trainer's. `train(cfg)` picks this trainer when `cfg.task == "semantic"`.

Classes: the manifest's `label_names` with `semantic.classes/merge/rename` applied as in `convert`
(`data.classes.class_table`); class 0 is the background. Synthetic data (`data.synthetic`) labels
its objects object_1..object_N. The run's adapter (`adapter.safetensors`) is a semantic adapter:
encoder PEFT tensors + head + classes (adapters/semantic.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError
from . import distributed as D
from .data_source import CountSkipped, SyntheticSlices, manifest_file
from .losses import semantic_loss
from .memory import SegmentedEncoder, autocast, grad_scaler
from .trainer import (RunClock, Trainer, TrainingParts, build_encoder, build_model_for, build_optimizer,
                      make_scheduler, resolve_device, wrap_distributed)
from .logging import RunLogger


class SyntheticSemantic(torch.utils.data.Dataset):
    """`SyntheticSlices` as (image, target): object j is class j + 1 (later objects paint over earlier ones)."""

    def __init__(self, slices: SyntheticSlices):
        self.slices = slices
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.slices)

    def set_epoch(self, epoch: int) -> None:
        self.slices.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = self.slices[index]
        target = torch.zeros(item["masks"].shape[-2:], dtype=torch.int64)
        for j in range(item["masks"].shape[0]):
            if item["object_valid"][j]:
                target[item["masks"][j] > 0] = j + 1
        return {"image": item["image"], "target": target, "input_size": item["input_size"],
                "original_size": item["original_size"], "index": item["index"]}


def resolve_classes(cfg):
    """The run's `ClassTable`: from the manifest's label table (synthetic data: object_1..object_N)."""
    from ..data.classes import class_table

    s = cfg.semantic
    if cfg.data.synthetic > 0:
        names = {i: f"object_{i}" for i in range(1, cfg.data.n_objects + 1)}
        return class_table(names, s.classes, s.merge, s.rename, source="synthetic data")
    manifest = manifest_file(cfg.data.manifest)
    from ..data import load_manifest

    info = load_manifest(manifest)
    return class_table(info.label_names, s.classes, s.merge, s.rename, source=str(manifest))


def build_semantic_datasets(cfg, img_size: int, table):
    """(train, val) semantic datasets; val is None when the split has no shards."""
    d = cfg.data
    if d.synthetic > 0:
        n_val = max(2, d.synthetic // 4)
        train = SyntheticSemantic(SyntheticSlices(d.synthetic, img_size, d.n_objects, seed=cfg.train.seed))
        val = SyntheticSemantic(SyntheticSlices(n_val, img_size, d.n_objects, seed=cfg.train.seed + 10_000))
        return CountSkipped(train), CountSkipped(val)
    from ..data import AugmentConfig, load_manifest
    from ..data.semantic_dataset import SemanticSlices

    manifest = manifest_file(cfg.data.manifest)
    info = load_manifest(manifest)
    if info.image_size != img_size:
        raise DataError(f"{manifest}: shards are {info.image_size}² but the model takes {img_size}² input; "
                        f"convert with size={img_size} or choose a matching model")
    if not info.shards_for(d.train_split):
        raise DataError(f"{manifest}: split '{d.train_split}' has no shards (data.train_split)")
    common = dict(table=table, seed=cfg.train.seed, include_empty=cfg.semantic.include_empty,
                  skip_corrupt=d.skip_corrupt, verify=d.verify)
    train = SemanticSlices(manifest, split=d.train_split, augment=AugmentConfig() if d.augment else None,
                           samples_per_epoch=d.samples_per_epoch, **common)
    val = None
    if info.shards_for(d.val_split):
        val = SemanticSlices(manifest, split=d.val_split, augment=None, samples_per_epoch=None, **common)
    return CountSkipped(train), (CountSkipped(val) if val is not None else None)


class SemanticStep(nn.Module):
    """Module whose forward is one micro-batch's semantic loss (so DDP can wrap it)."""

    def __init__(self, model: nn.Module, encoder: SegmentedEncoder, cfg):
        super().__init__()
        self.model = model
        self.encoder = encoder
        s = cfg.semantic
        self.dice_weight, self.ce_weight = s.dice, s.ce
        weights = None
        if s.class_weights is not None:
            if len(s.class_weights) != model.num_classes:
                raise ConfigError(f"semantic.class_weights: {len(s.class_weights)} weights for {model.num_classes} "
                                  f"classes {model.class_names} (background first)")
            weights = torch.tensor(s.class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images, self.model.taps)
        emb, taps = out if self.model.taps else (out, [])
        return self.model.decode(emb, taps, images)

    def forward(self, images: torch.Tensor, target: torch.Tensor):
        logits = self.logits(images)
        loss, parts = semantic_loss(logits, target, self.dice_weight, self.ce_weight, self.class_weights)
        return loss, logits.detach(), parts


def _column(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class SemanticTrainer(Trainer):
    """The `Trainer` loop with a semantic head: own parts, `train_step`, `validate` and adapter."""

    monitor = "val_dice"  # mean foreground-class Dice on the val split

    @classmethod
    def build_parts(cls, cfg, model=None) -> TrainingParts:
        """Like `trainer.build_parts`, in the same RNG order (base weights, then adapter and head init).

        `model`: a base `MedSam` (plain, not injected) or None to build it from `cfg.model`.
        """
        from ..models.semantic import SemanticSam, build_semantic
        from ..tuners.semantic import inject_semantic

        info = D.setup(cfg.train.device)
        device = resolve_device(cfg.train.device, info)
        torch.manual_seed(cfg.train.seed)
        table = resolve_classes(cfg)
        if isinstance(model, SemanticSam):
            raise ConfigError("train: pass the base MedSam (the semantic head is built from cfg.semantic)")
        sam = model if model is not None else build_model_for(cfg)
        semantic = build_semantic(sam, cfg.semantic.head, table.num_classes, table.names,
                                  channels=cfg.semantic.channels)
        inject_semantic(semantic, cfg.peft_config())
        semantic.to(device).train()
        semantic.class_table = table
        train_ds, val_ds = build_semantic_datasets(cfg, sam.img_size, table)
        encoder = build_encoder(cfg, sam)
        step = SemanticStep(semantic, encoder, cfg).to(device)
        step_module = wrap_distributed(step, info, device)
        params, optimizer = build_optimizer(cfg, semantic)
        sampler = D.ResumableSampler(train_ds, info, shuffle=True, seed=cfg.train.seed)
        batches_per_epoch = math.ceil(sampler.num_samples / cfg.train.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum)
        out_dir = Path(cfg.output.dir)
        clock = RunClock()
        return TrainingParts(
            cfg=cfg, info=info, device=device, out_dir=out_dir, model=semantic, encoder=encoder,
            step_module=step_module, train_ds=train_ds, val_ds=val_ds, params=params, optimizer=optimizer,
            sampler=sampler, scheduler=make_scheduler(cfg, optimizer, steps_per_epoch * cfg.train.epochs, clock),
            clock=clock,
            scaler=grad_scaler(cfg.memory.precision, device),
            clicks=torch.Generator().manual_seed(cfg.train.seed * 1000 + info.rank),  # unused; checkpointed RNG slot
            logger=RunLogger(out_dir, info.is_main, cfg.output.tensorboard),
            batches_per_epoch=batches_per_epoch, steps_per_epoch=steps_per_epoch)

    # --- phases --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        images = batch["image"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        scale = self.scale_fn(cfg.train.grad_accum)
        with autocast(cfg.memory.precision, self.device):
            loss, logits, parts = self.parts.step_module(images, target)
        self.check_finite(loss)
        scale(loss).backward()
        from ..evaluation.semantic_metrics import class_counts, dice_from_counts, mean_foreground_dice

        dice = mean_foreground_dice(dice_from_counts(class_counts(logits.argmax(1), target, self.model.num_classes)))
        return {"loss": loss.item(), "dice": 0.0 if math.isnan(dice) else dice}

    def class_columns(self) -> list[str]:
        return [f"val_dice_{i}_{_column(n)}" for i, n in enumerate(self.model.class_names) if i > 0]

    def empty_validation(self) -> dict[str, float]:
        return {"val_dice": math.nan, **{c: math.nan for c in self.class_columns()}}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Pooled per-class Dice over the val split (all ranks' pixels), and their mean (`val_dice`)."""
        from ..evaluation.semantic_metrics import class_counts, dice_from_counts, mean_foreground_dice

        p, cfg = self.parts, self.cfg
        out = self.empty_validation()
        if p.val_ds is None:
            return out
        self.model.eval()
        loader = self.val_loader()
        c = self.model.num_classes
        counts = torch.zeros(3, c, dtype=torch.int64)
        step = p.step_module.module if isinstance(p.step_module, nn.parallel.DistributedDataParallel) \
            else p.step_module
        for batch in loader:
            images = batch["image"].to(self.device)
            with autocast(cfg.memory.precision, self.device):
                logits = step.logits(images)
            counts += class_counts(logits.argmax(1).cpu(), batch["target"], c)
        self.model.train()
        flat = D.all_reduce_sum([float(v) for v in counts.flatten()], self.info, self.device)
        counts = torch.tensor(flat, dtype=torch.float64).reshape(3, c)
        dice = dice_from_counts(counts)
        out["val_dice"] = mean_foreground_dice(dice)
        for col, d in zip(self.class_columns(), dice[1:]):
            out[col] = d
        return out

    def val_summary(self, row: dict) -> str:
        return f"val mean class Dice {row['val_dice']:.3f} ({self.model.num_classes - 1} classes)"

    def write_adapter(self, path: Path, extra: dict) -> Path:
        from ..adapters.semantic import save_semantic_adapter

        extra = {**extra, "classes": self.model.class_table.to_dict()}
        return save_semantic_adapter(self.model, path, extra_metadata=extra)
