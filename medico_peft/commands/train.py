"""`medico-peft train --config RECIPE.yaml [key.sub=value ...] [--resume]`."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="finetune SAM interactively (LoRA/DoRA/adapters/full) from a YAML recipe",
        description="Train per a recipe in configs/. Overrides use key.sub=value, e.g. optim.lr=3e-4 "
                    "data.manifest=shards/manifest.json output.dir=runs/x. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m medico_peft.cli train ...")
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue from output.dir/latest.pt")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..training import TrainConfig, train

    cfg = TrainConfig.from_yaml(args.config, overrides=args.overrides)
    result = train(cfg, resume=args.resume)
    best = "n/a" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
    print(f"adapter: {result.adapter_path}\nbest val Dice: {best}\nskipped samples: {result.skipped_samples}\n"
          f"train time: {result.train_seconds:.1f} s, peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB")
    return 0
