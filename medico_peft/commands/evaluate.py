"""`medico-peft evaluate`: MedicoSAM's interactive protocol (start prompt + corrective clicks) on a split."""

from __future__ import annotations

import argparse

from ._options import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="interactive evaluation: box/point start + corrective clicks, Dice per step",
        description="Start from one tight box or one centre point, then K corrective clicks at the centre of "
                    "the deeper error (previous logits fed back). Writes per_object.csv, summary.md, "
                    "summary.json, dice_vs_clicks.png and overlay PNGs to --out. With --3d: a volume and its label "
                    "volume (or --data), one box/point on each object's middle slice propagated through the volume, "
                    "then --rounds corrective clicks on the worst slice; 3D Dice and NSD per round.",
    )
    add_model_arguments(p)
    p.add_argument("--adapter", help="adapter .safetensors to load onto the base model")
    p.add_argument("--manifest", help="shard set manifest.json (or its folder); required without --3d")
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
    p.add_argument("--click-merge", choices=("local", "near", "none"), default=None,
                   help="how a click's answer is accepted: local (default, as the Predictor and training's "
                        "validation) keeps the previous mask except the regions the click asked to change; near "
                        "also bounds them to 3 click radii around the click (thin structures); none takes the "
                        "decoder's whole answer")
    p.add_argument("--semantic", action="store_true",
                   help="automatic multi-class evaluation of a semantic adapter (--adapter): per-class Dice per slice "
                        "(2D) and per volume (3D), confusion summary, overlays with a legend; writes summary.md, "
                        "per_class.csv, per_slice.csv, confusion.csv/png (--start/--clicks do not apply)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("3D (--3d): segment whole structures in a volume; --labels items are objects "
                             "([NAME=]SPEC[+SPEC...], a SPEC being an id, name or glob; matches are merged)")
    g.add_argument("--3d", dest="three_d", action="store_true", help="3D protocol on a volume instead of shards")
    g.add_argument("--image", help="image volume (NIfTI)")
    g.add_argument("--label-volume", help="label volume (NIfTI) on the image's grid")
    g.add_argument("--label-names", help="'id name' text file naming the label ids (e.g. aal.nii.txt)")
    g.add_argument("--data", choices=("colin27", "mni152"),
                   help="built-in real data instead of --image: Colin27 T1 + AAL, or MNI152 with GM/WM/brain")
    g.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slicing axis (default 2)")
    g.add_argument("--rounds", type=int, default=5, help="corrective rounds, one click each (default 5)")
    g.add_argument("--start-slice", default="middle", choices=("middle", "largest"),
                   help="prompt the middle of the object's extent or its largest cross-section")
    g.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    g.add_argument("--montages", type=int, default=4, help="slice-montage PNGs (one per object)")
    g.add_argument("--cache-slices", type=int, default=256, help="slice embeddings kept in memory")
    g.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    g.add_argument("--onnx", help="onnxruntime backend: folder written by `export onnx`")
    g.add_argument("--engine", help="tensorrt backend: folder written by `export tensorrt`")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.interactive import evaluate_interactive
    from ..models import load_model
    from ..utils.paths import prepare_output_dir

    if args.three_d:
        return run_3d(args)
    from ..errors import ConfigError

    if args.image or args.label_volume or args.data:
        raise ConfigError("--image/--label-volume/--data: volume inputs need --3d")
    if not args.manifest:
        raise ConfigError("--manifest: the 2D protocol needs a shard set (or pass --3d with a volume)")
    prepare_output_dir(args.out, args.overwrite)
    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if args.semantic:
        return run_semantic(args, model)
    if args.adapter:
        from ..adapters import load_adapter

        model = load_adapter(model, args.adapter)
    radius = {} if args.click_radius is None else {"click_radius": args.click_radius}
    if args.click_merge is not None:
        radius["click_merge"] = args.click_merge
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


def run_3d(args: argparse.Namespace) -> int:
    from ..evaluation.volume import evaluate_volume, load_volume_input, select_objects
    from ..utils.paths import prepare_output_dir
    from .predict import make_predictor

    prepare_output_dir(args.out, args.overwrite)
    vol = load_volume_input(image=args.image, label_volume=args.label_volume, label_names=args.label_names,
                            data=args.data)
    objects = select_objects(vol, [x for item in args.labels for x in item.split(",") if x] if args.labels else None,
                             args.image or args.data)
    predictor = make_predictor(args)
    result = evaluate_volume(predictor, vol.image, objects, axis=args.axis, spacing=vol.spacing, affine=vol.affine,
                             start=args.start, start_slice=args.start_slice, rounds=args.rounds,
                             tolerance_mm=args.tolerance_mm, out_dir=args.out, n_montages=args.montages,
                             volume_id=vol.volume_id, progress=not args.no_progress,
                             volume_options={"cache_slices": args.cache_slices})
    print(f"{result.n_objects} objects along axis {args.axis}: mean 3D Dice {result.mean_dice[0]:.3f} at the "
          f"{args.start} start, {result.mean_dice[-1]:.3f} after {args.rounds} rounds (NSD@{args.tolerance_mm:g}mm "
          f"{result.mean_nsd[-1]:.3f}) -> {result.files['summary_md']}")
    return 0
