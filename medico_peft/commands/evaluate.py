"""`medico-peft evaluate`: MedicoSAM's interactive protocol (start prompt + corrective clicks) on a split."""

from __future__ import annotations

import argparse

from ._options import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="interactive evaluation: box/point start + corrective clicks, Dice per step",
        description="Start from one tight box or one centre point, then K corrective clicks at the centre of "
                    "the deeper error (previous logits fed back). Writes per_object.csv, summary.md, "
                    "summary.json, dice_vs_clicks.png and overlay PNGs to --out.",
    )
    add_model_arguments(p)
    p.add_argument("--adapter", help="adapter .safetensors to load onto the base model")
    p.add_argument("--manifest", required=True, help="shard set manifest.json (or its folder)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--start", default="box", choices=("box", "point"))
    p.add_argument("--clicks", type=int, default=7, help="corrective clicks after the start prompt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    p.add_argument("--max-slices", type=int, help="evaluate only the first N eligible slices")
    p.add_argument("--labels", nargs="+", help="label ids or name globs to evaluate (default: all)")
    p.add_argument("--overlays", type=int, default=4, help="number of overlay PNGs")
    p.add_argument("--no-mask-input", action="store_true",
                   help="do not feed previous logits back (diagnostic for box-only models)")
    p.add_argument("--click-radius", type=float, default=None,
                   help="disk radius (mask-grid pixels) each click paints into the fed-back logits; "
                        "default: the library's (models/click_prompt.py), as in training; 0 = points only")
    p.add_argument("--semantic", action="store_true",
                   help="automatic multi-class evaluation of a semantic adapter (--adapter): per-class Dice per slice "
                        "(2D) and per volume (3D), confusion summary, overlays with a legend; writes summary.md, "
                        "per_class.csv, per_slice.csv, confusion.csv/png (--start/--clicks do not apply)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.interactive import evaluate_interactive
    from ..models import load_model
    from ..utils.paths import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite)
    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if args.semantic:
        return run_semantic(args, model)
    if args.adapter:
        from ..adapters import load_adapter

        model = load_adapter(model, args.adapter)
    radius = {} if args.click_radius is None else {"click_radius": args.click_radius}
    labels = [x for item in args.labels for x in item.split(",") if x] if args.labels else None
    result = evaluate_interactive(model, args.manifest, split=args.split, start=args.start, n_clicks=args.clicks,
                                  out_dir=args.out, max_slices=args.max_slices, labels=labels,
                                  n_overlays=args.overlays, progress=not args.no_progress,
                                  use_mask_input=not args.no_mask_input, **radius)
    steps = result.mean_dice
    print(f"{result.n_objects} objects on {result.n_slices} slices: mean Dice {steps[0]:.3f} at the {args.start} "
          f"start, {steps[-1]:.3f} after {result.n_clicks} clicks -> {result.files['summary_md']}")
    return 0


def run_semantic(args: argparse.Namespace, model) -> int:
    from ..adapters import load_semantic_adapter
    from ..errors import ConfigError
    from ..evaluation.semantic import evaluate_semantic

    if not args.adapter:
        raise ConfigError("--adapter: evaluate --semantic needs a semantic adapter file (PEFT + class head)")
    if args.labels:
        raise ConfigError("--labels: evaluate --semantic scores the classes of the adapter's head; drop --labels")
    model = load_semantic_adapter(model, args.adapter)
    result = evaluate_semantic(model, args.manifest, split=args.split, out_dir=args.out, overwrite=args.overwrite,
                               max_slices=args.max_slices, n_overlays=args.overlays, progress=not args.no_progress)
    three_d = f", 3D {result.mean_dice_3d:.3f}" if result.volumetric else ""
    print(f"{result.n_slices} slices, {len(result.class_names) - 1} classes: mean Dice 2D {result.mean_dice_2d:.3f}"
          f"{three_d} -> {result.files['summary_md']}")
    return 0
