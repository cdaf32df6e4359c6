"""`medico-peft export onnx|tensorrt`: fused ONNX graphs behind a parity gate; TensorRT engines from them."""

from __future__ import annotations

import argparse

from ._options import add_model_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a model (+ adapter) to ONNX or TensorRT")
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT", required=True)

    onnx = sub.add_parser("onnx", help="image encoder + prompt decoder ONNX graphs with a parity gate")
    add_model_arguments(onnx, default=None)
    onnx.add_argument("--adapter", help="adapter .safetensors to fuse (LoRA/DoRA folded, bottleneck kept)")
    onnx.add_argument("--semantic", action="store_true",
                      help="--adapter is a semantic adapter (class head): export one graph image -> class logits "
                           "(semantic.onnx); with --with-preprocess it takes an H×W×3 image of any size and returns "
                           "logits at that size")
    onnx.add_argument("--out", required=True, help="output folder")
    onnx.add_argument("--overwrite", action="store_true",
                      help="replace the export in a non-empty --out folder (the old one stays usable until the new one passes its gate)")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--with-preprocess", action="store_true",
                      help="resize/normalise/pad inside the encoder graph (input: H×W×3 image of any size)")
    onnx.add_argument("--input-dtype", choices=["uint8", "float32"], default="uint8",
                      help="image dtype of the in-graph preprocessing input")
    onnx.add_argument("--mask-outputs", choices=["all", "single", "multi"], default="all",
                      help="decoder mask tokens to output (all = single-mask answer + 3 multimask answers)")
    onnx.add_argument("--simplify", action="store_true", help="simplify the graphs with onnxslim")
    onnx.add_argument("--external-data", action="store_true",
                      help="weights in <graph>.onnx.data (automatic above 2 GB)")
    onnx.add_argument("--atol", type=float, default=1e-3, help="parity tolerance on logits (decoder) and embeddings")
    onnx.add_argument("--end-to-end-atol", type=float, default=1e-2)
    onnx.add_argument("--parity-images", type=int, default=4, help="random images of different aspect ratios")
    onnx.add_argument("--real-images", type=int, default=1, help="MNI152 slices (nilearn) in the parity gate")
    onnx.add_argument("--threads", type=int, help="onnxruntime threads for the parity gate")
    onnx.add_argument("--max-batch", type=int, default=1,
                      help="images per encoder call (a dynamic batch dimension for volumes; not with "
                           "--with-preprocess); TensorRT engines built from the export get a profile up to it")
    onnx.set_defaults(handler=run_onnx)

    trt = sub.add_parser("tensorrt", help="TensorRT engines from an ONNX export folder")
    trt.add_argument("--onnx", required=True, help="folder written by `export onnx`")
    trt.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    trt.add_argument("--out", required=True, help="output folder")
    trt.add_argument("--overwrite", action="store_true",
                     help="replace the export in a non-empty --out folder (the old one stays usable until the new one passes its gate)")
    trt.add_argument("--max-points", type=int, default=16, help="largest number of prompt points (incl. box corners)")
    trt.add_argument("--workspace-gb", type=float, default=4.0)
    trt.add_argument("--timing-cache", help="timing cache file (read and updated)")
    trt.add_argument("--atol", type=float, help="engine vs onnxruntime tolerance (default by precision)")
    trt.set_defaults(handler=run_tensorrt)


def run_onnx(args: argparse.Namespace) -> int:
    from medico_peft.errors import ConfigError
    from medico_peft.export.fuse import fuse
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.export.parity import Tolerance
    from medico_peft.models import load_model
    from medico_peft.utils.paths import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite)
    if not args.model and not args.checkpoint:
        raise ConfigError("--model or --checkpoint: give a model name or a checkpoint path")
    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if args.semantic:
        return run_semantic_onnx(args, model)
    model, info = fuse(model, args.adapter)
    tol = Tolerance(embeddings_atol=args.atol, logits_atol=args.atol, iou_atol=args.atol,
                    end_to_end_atol=args.end_to_end_atol)
    meta = export_onnx(model, args.out, opset=args.opset, with_preprocess=args.with_preprocess,
                       input_dtype=args.input_dtype, mask_outputs=args.mask_outputs, simplify=args.simplify,
                       tolerance=tol, adapter_info=info, external_data=True if args.external_data else None,
                       parity_random=args.parity_images, parity_real=args.real_images, threads=args.threads,
                       max_batch=args.max_batch)
    worst = meta["parity"]["max"]
    print(f"wrote {args.out}/encoder.onnx, decoder.onnx, export.json ({meta['export_seconds']:.1f} s); parity max: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return 0


def run_semantic_onnx(args: argparse.Namespace, model) -> int:
    from medico_peft.errors import ConfigError
    from medico_peft.export.semantic_export import SemanticTolerance, export_semantic_adapter

    if not args.adapter:
        raise ConfigError("--adapter: export onnx --semantic needs a semantic adapter file (PEFT + class head)")
    meta = export_semantic_adapter(model, args.adapter, args.out, opset=args.opset,
                                   with_preprocess=args.with_preprocess, input_dtype=args.input_dtype,
                                   simplify=args.simplify, external_data=True if args.external_data else None,
                                   tolerance=SemanticTolerance(logits_atol=args.end_to_end_atol),
                                   parity_random=args.parity_images, parity_real=args.real_images,
                                   threads=args.threads)
    worst = meta["parity"]["max"]
    print(f"wrote {args.out}/semantic.onnx, export.json ({meta['semantic']['num_classes']} classes, logits at the "
          f"{meta['semantic']['logits_at']} size, {meta['export_seconds']:.1f} s); parity max: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from medico_peft.export.tensorrt_build import build_engines
    from medico_peft.utils.paths import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite)
    meta = build_engines(args.onnx, args.out, precision=args.precision, max_points=args.max_points,
                         workspace_gb=args.workspace_gb, timing_cache=args.timing_cache, atol=args.atol)
    engines = ", ".join(f"{part}.engine" for part in meta["engines"])
    print(f"wrote {args.out}/{engines}, engine.json (TensorRT {meta['tensorrt_version']}, "
          f"{meta['gpu_name']}, {args.precision}); parity vs onnxruntime: {meta['parity']['max']}")
    return 0
