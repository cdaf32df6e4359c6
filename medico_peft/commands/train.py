"""`medico-peft train --config RECIPE.yaml [key.sub=value ...] [--base-dtype bfloat16]
[--resume | --resume-if-possible | --overwrite]`."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="finetune SAM interactively (LoRA/DoRA/adapters/full) from a YAML recipe",
        description="Train per a recipe in configs/. Overrides use key.sub=value, e.g. optim.lr=3e-4 "
                    "data.manifest=shards/manifest.json output.dir=runs/x. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m medico_peft.cli train ...")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    base = p.add_argument("--base-dtype", metavar="{float32,bfloat16}",
                          help="= the override train.base_dtype=VALUE (given last, so it wins)")
    base.deferred_help = _base_dtype_help
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from output.dir/latest.pt (an error if there is none)")
    start.add_argument("--resume-if-possible", action="store_true",
                       help="continue from output.dir/latest.pt if it exists, else start a new run")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run even if output.dir holds one (its checkpoints, adapter and "
                            "metrics are removed); without it such a folder is refused")
    p.set_defaults(handler=run)


def _base_dtype_help() -> str:
    from ..training.config import TrainLoopConfig
    from ..utils.config import field_help

    return f"train.base_dtype: {field_help(TrainLoopConfig, 'base_dtype')} (default: the recipe's, else float32)"


def run(args) -> int:
    from ..training import TrainConfig, train

    overrides = list(args.overrides)
    if args.base_dtype is not None:
        overrides.append(f"train.base_dtype={args.base_dtype}")
    cfg = TrainConfig.from_yaml(args.config, overrides=overrides)
    resume = "auto" if args.resume_if_possible else args.resume
    result = train(cfg, resume=resume, overwrite=args.overwrite)
    best = "n/a" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
    print(f"adapter: {result.adapter_path}\nbest val Dice: {best}\nskipped samples: {result.skipped_samples}\n"
          f"train time: {result.train_seconds:.1f} s, peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB")
    return 0
