"""`medico-peft predict`: segment one image with a box or points on any backend; writes mask + overlay PNGs.
With --volume: segment whole 3D objects from prompts on one slice each (workflows/volume_predict.py)."""

from __future__ import annotations

import argparse

from ._options import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment an image from a box or points (torch, onnxruntime, tensorrt)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    add_model_arguments(p, default=None)  # torch backend only
    p.add_argument("--adapter", help="torch backend: adapter .safetensors")
    p.add_argument("--onnx", help="onnxruntime backend: folder written by `export onnx`")
    p.add_argument("--engine", help="tensorrt backend: folder written by `export tensorrt`")
    p.add_argument("--image", required=True, help="PNG/JPEG/TIFF, .npy or NIfTI (.nii/.nii.gz)")
    p.add_argument("--slice", type=int, action="append",
                   help="slice index for 3D inputs (default: middle); with --volume the prompted slice, one per --box")
    p.add_argument("--axis", type=int, default=2, help="slicing axis for 3D inputs")
    p.add_argument("--box", type=float, nargs=4, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                   help="box in slice pixels; with --volume repeat it for several objects (one label id each)")
    p.add_argument("--point", type=float, nargs=2, action="append", metavar=("X", "Y"), help="positive point")
    p.add_argument("--neg-point", type=float, nargs=2, action="append", metavar=("X", "Y"), help="negative point")
    p.add_argument("--multimask", action="store_true", help="three candidate masks; the best-scoring one is written")
    p.add_argument("--semantic", action="store_true",
                   help="automatic multi-class segmentation with a semantic adapter/export (no prompts): a 2D image "
                        "gives labels.png; a NIfTI/.npy volume without --slice gives labels.nii.gz (labels.npy), "
                        "predicted slice by slice along --axis on the same grid; plus labels_overlay.png, classes.json")
    v = p.add_argument_group("volumes (--volume)")
    v.add_argument("--volume", action="store_true",
                   help="segment the whole 3D object: prompt one slice, propagate through the volume; writes "
                        "mask.nii.gz (the input's grid) and montage.png. --image: NIfTI, .npy or a DICOM folder")
    v.add_argument("--prompts", help="JSON list of objects [{\"slice\": k, \"box\": [x0, y0, x1, y1]} or "
                                     "\"points\"/\"labels\"] instead of --slice/--box/--point")
    v.add_argument("--correct", nargs=4, type=float, action="append", metavar=("SLICE", "X", "Y", "LABEL"),
                   help="a corrective click after propagation: on slice SLICE at pixel (X, Y), LABEL 1 = object, "
                        "0 = background; re-segments that slice and re-propagates (repeatable, applied in order; "
                        "one-object calls; in a --prompts file: an object's \"corrections\" list)")
    v.add_argument("--intensity", default="mr_percentile",
                   help="volume-wide intensity window (data.normalize preset: mr_percentile, minmax, ct_soft_tissue, "
                        "...; 'none' = per-slice min-max); default mr_percentile")
    v.add_argument("--prompt-mode", default=None, help="how a slice prompts the next (VolumePredictor.prompt_mode)")
    v.add_argument("--stop-iou", type=float, default=None, help="stop propagating below this predicted IoU")
    v.add_argument("--box-margin", type=float, default=None,
                   help="voxels added to each side of the box carried to the next slice")
    p.add_argument("--out", required=True, help="output folder (mask.png, mask_overlay.png; with --volume "
                                                "mask.nii.gz, montage.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    p.set_defaults(handler=run)


def make_predictor(args):
    from medico_peft.errors import ConfigError
    from medico_peft.runtime import Predictor

    if args.backend == "onnxruntime":
        if not args.onnx:
            raise ConfigError("--onnx: the onnxruntime backend needs the folder written by `export onnx`")
        return Predictor.from_onnx(args.onnx)
    if args.backend == "tensorrt":
        if not args.engine:
            raise ConfigError("--engine: the tensorrt backend needs the folder written by `export tensorrt`")
        return Predictor.from_tensorrt(args.engine)
    if not args.model and not args.checkpoint:
        raise ConfigError("--model or --checkpoint: the torch backend needs a model")
    from medico_peft.models import load_model

    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if getattr(args, "semantic", False):
        if not args.adapter:
            raise ConfigError("--adapter: predict --semantic on the torch backend needs a semantic adapter file")
        from medico_peft.adapters import load_semantic_adapter

        return Predictor.from_torch(load_semantic_adapter(model, args.adapter))
    if args.adapter:
        from medico_peft.adapters import load_adapter

        model = load_adapter(model, args.adapter)
    return Predictor.from_torch(model)


def run_volume(args: argparse.Namespace) -> int:
    from medico_peft.errors import ConfigError
    from medico_peft.workflows.volume_predict import load_prompts_file, objects_from_args, predict_volume

    if args.multimask:
        raise ConfigError("--multimask: not used with --volume (propagation takes the single-mask answer)")
    if args.prompts and args.correct:
        raise ConfigError("--correct: with --prompts, give an object's clicks in its \"corrections\" list instead")
    objects = (load_prompts_file(args.prompts) if args.prompts
               else objects_from_args(args.slice, args.box, args.point, args.neg_point, args.correct))
    options = {k: v for k, v in (("prompt_mode", args.prompt_mode), ("stop_iou", args.stop_iou),
                                          ("box_margin", args.box_margin)) if v is not None}
    intensity = None if args.intensity.lower() == "none" else args.intensity
    summary = predict_volume(args.image, args.out, lambda: make_predictor(args), objects, axis=args.axis,
                             overwrite=args.overwrite, intensity=intensity, **options)
    voxels = ", ".join(f"object {i}: {n} voxels" for i, n in summary["voxels"].items()) or "nothing segmented"
    print(f"wrote {summary['mask']} and {summary['montage']} ({voxels}; {summary['encoded_slices']} slices encoded)")
    return 0


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from medico_peft.errors import ConfigError
    from medico_peft.runtime.image_io import read_image, write_mask_and_overlay
    from medico_peft.utils.paths import prepare_output_dir

    if args.volume:
        return run_volume(args)
    if args.prompts:
        raise ConfigError("--prompts: only with --volume")
    if args.correct:
        raise ConfigError("--correct: only with --volume (a 2D prediction takes its clicks as --point/--neg-point)")
    if len(args.box or []) > 1 or len(args.slice or []) > 1:
        raise ConfigError("--box/--slice: one each for a 2D prediction (several objects need --volume)")
    box = args.box[0] if args.box else None
    prepare_output_dir(args.out, args.overwrite)
    if args.semantic:
        return run_semantic(args)
    image = read_image(args.image, args.slice[0] if args.slice else None, args.axis)
    predictor = make_predictor(args)
    points = (args.point or []) + (args.neg_point or [])
    labels = [1] * len(args.point or []) + [0] * len(args.neg_point or [])
    predictor.set_image(image)
    out = predictor.predict(points=points or None, labels=labels or None, box=box, multimask=args.multimask)
    best = int(np.argmax(out.scores))
    mask_path, overlay_path = write_mask_and_overlay(args.out, image, out.masks[best])
    print(f"wrote {mask_path} and {overlay_path} ({int(out.masks[best].sum())} px, score {out.scores[best]:.3f}, "
          f"backend {predictor.backend_name})")
    return 0


def run_semantic(args: argparse.Namespace) -> int:
    from medico_peft.runtime.semantic_io import predict_semantic_file

    from medico_peft.errors import ConfigError

    if args.box or args.point or args.neg_point or args.multimask or args.volume:
        raise ConfigError("--semantic takes no prompts: drop --box/--point/--neg-point/--multimask/--volume")
    if args.slice and len(args.slice) > 1:
        raise ConfigError(f"--slice: --semantic takes one slice index (or none for the whole volume), got {args.slice}")
    result = predict_semantic_file(make_predictor(args), args.image, args.out, axis=args.axis,
                                   slice_index=args.slice[0] if args.slice else None)
    found = ", ".join(f"{name} {n}" for name, n in result["counts"].items())
    print(f"wrote {result['files']['labels']}, {result['files']['overlay'].name}, classes.json "
          f"({result['kind']}; voxels per class: {found})")
    return 0
