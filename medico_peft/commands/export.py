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
    add_quantize_arguments(onnx)
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
    for flag in INT8_ONLY:  # refused with one clear message instead of argparse's "unrecognized arguments"
        trt.add_argument(flag, dest=f"int8_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    trt.set_defaults(handler=run_tensorrt)


INT8_ONLY = ("--quantize", "--quant-mode", "--calibration", "--calibration-slices", "--gate-slices", "--gate-dice",
             "--gate-logit-mean", "--gate-logit-max")
TRT_ONLY = ("--precision", "--max-points", "--workspace-gb", "--timing-cache")


def add_quantize_arguments(parser) -> None:
    from medico_peft.export.quantize import DEFAULT_CALIBRATION_SLICES, DEFAULT_GATE_SLICES, QUANT_MODES, QuantGate

    g = QuantGate()
    q = parser.add_argument_group("int8 (onnxruntime CPU)")
    q.add_argument("--quantize", choices=["int8"],
                   help="write int8 graphs (onnxruntime quantization) behind an accuracy gate against the fp32 export")
    q.add_argument("--quant-mode", choices=list(QUANT_MODES), default=None,
                   help="auto (default): per graph the fastest of fp32/dynamic/static measured on this CPU; "
                        "static needs --calibration")
    q.add_argument("--calibration", metavar="MANIFEST",
                   help="shard manifest (at the model's size) for calibration and the gate; default: the built-in "
                        "Colin27 + AAL slices (dynamic only)")
    q.add_argument("--calibration-slices", type=int, default=None,
                   help=f"slices to calibrate on (default {DEFAULT_CALIBRATION_SLICES})")
    q.add_argument("--gate-slices", type=int, default=None,
                   help=f"held-out slices the gate compares int8 with fp32 on (default {DEFAULT_GATE_SLICES})")
    q.add_argument("--gate-dice", type=float, default=None,
                   help=f"minimum mean mask Dice of int8 to fp32, one box per object (default {g.min_dice})")
    q.add_argument("--gate-logit-mean", type=float, default=None,
                   help=f"maximum mean abs full-resolution logit error (default {g.max_logit_mean})")
    q.add_argument("--gate-logit-max", type=float, default=None,
                   help=f"maximum abs logit error anywhere (default {g.max_logit_max})")
    for flag in TRT_ONLY:  # refused with one clear message instead of argparse's "unrecognized arguments"
        parser.add_argument(flag, dest=f"trt_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)


def _given(args, prefix: str, flags) -> list[str]:
    return [f for f in flags if getattr(args, f"{prefix}{f[2:].replace('-', '_')}", None) is not None]


def check_quantize_options(args) -> None:
    """One clear error for an int8 option without --quantize, a TensorRT option on `export onnx`, and
    --quantize with --semantic; static mode without calibration is refused by the exporter."""
    from medico_peft.errors import ConfigError

    trt = _given(args, "trt_", TRT_ONLY)
    if trt:
        raise ConfigError(f"{', '.join(trt)}: TensorRT option(s), not for `export onnx`; build engines with "
                          "`medico-peft export tensorrt --onnx FOLDER` from an fp32 export"
                          + ("; --quantize int8 is onnxruntime CPU only" if args.quantize else ""))
    quant = _given(args, "", INT8_ONLY[1:])
    if quant and not args.quantize:
        raise ConfigError(f"{', '.join(quant)}: only with --quantize int8")
    if args.quant_mode == "static" and not args.calibration:
        raise ConfigError("--quant-mode static: needs --calibration MANIFEST (shards of your data at the model's size) "
                          "to calibrate activation ranges; or use --quant-mode dynamic")
    if args.quantize and args.semantic:
        raise ConfigError("--quantize: int8 export covers interactive exports (encoder + decoder), not --semantic")


def run_onnx(args: argparse.Namespace) -> int:
    from medico_peft.errors import ConfigError
    from medico_peft.export.fuse import fuse
    from medico_peft.export.onnx_export import export_onnx
    from medico_peft.export.parity import Tolerance
    from medico_peft.models import load_model
    from medico_peft.utils.paths import prepare_output_dir

    check_quantize_options(args)
    prepare_output_dir(args.out, args.overwrite)
    if not args.model and not args.checkpoint:
        raise ConfigError("--model or --checkpoint: give a model name or a checkpoint path")
    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if args.semantic:
        return run_semantic_onnx(args, model)
    model, info = fuse(model, args.adapter)
    tol = Tolerance(embeddings_atol=args.atol, logits_atol=args.atol, iou_atol=args.atol,
                    end_to_end_atol=args.end_to_end_atol)
    if args.quantize:
        return run_int8(args, model, tol, info)
    meta = export_onnx(model, args.out, opset=args.opset, with_preprocess=args.with_preprocess,
                       input_dtype=args.input_dtype, mask_outputs=args.mask_outputs, simplify=args.simplify,
                       tolerance=tol, adapter_info=info, external_data=True if args.external_data else None,
                       parity_random=args.parity_images, parity_real=args.real_images, threads=args.threads,
                       max_batch=args.max_batch)
    worst = meta["parity"]["max"]
    print(f"wrote {args.out}/encoder.onnx, decoder.onnx, export.json ({meta['export_seconds']:.1f} s); parity max: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return 0


def run_int8(args: argparse.Namespace, model, tol, info) -> int:
    from medico_peft.export.quantize import (DEFAULT_CALIBRATION_SLICES, DEFAULT_GATE_SLICES, QuantGate,
                                             export_onnx_int8)

    d = QuantGate()
    gate = QuantGate(min_dice=d.min_dice if args.gate_dice is None else args.gate_dice,
                     max_logit_mean=d.max_logit_mean if args.gate_logit_mean is None else args.gate_logit_mean,
                     max_logit_max=d.max_logit_max if args.gate_logit_max is None else args.gate_logit_max)
    meta = export_onnx_int8(
        model, args.out, mode=args.quant_mode or "auto", calibration=args.calibration,
        calibration_slices=DEFAULT_CALIBRATION_SLICES if args.calibration_slices is None else args.calibration_slices,
        gate_slices=DEFAULT_GATE_SLICES if args.gate_slices is None else args.gate_slices, gate=gate,
        threads=args.threads, opset=args.opset, with_preprocess=args.with_preprocess, input_dtype=args.input_dtype,
        mask_outputs=args.mask_outputs, simplify=args.simplify, tolerance=tol, adapter_info=info,
        external_data=True if args.external_data else None, parity_random=args.parity_images,
        parity_real=args.real_images, max_batch=args.max_batch)
    q = meta["quantization"]
    modes = ", ".join(f"{part} {g['mode']}" for part, g in q["graphs"].items())
    g = q["gate"]
    print(f"wrote {args.out}/encoder.onnx, decoder.onnx, export.json (int8: {modes}); gate on {g['slices']} "
          f"{'held-out ' if g['held_out'] else ''}slices, {g['objects']} boxes: mean mask Dice to fp32 "
          f"{g['mean_dice_to_fp32']:.4f} (>= {gate.min_dice:g}), logit error mean {g['logit_mean_abs']:.3f} "
          f"(<= {gate.max_logit_mean:g}), max {g['logit_max_abs']:.2f} (<= {gate.max_logit_max:g})")
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
    from medico_peft.errors import ConfigError
    from medico_peft.export.tensorrt_build import build_engines
    from medico_peft.utils.paths import prepare_output_dir

    int8 = _given(args, "int8_", INT8_ONLY)
    if int8:
        raise ConfigError(f"{', '.join(int8)}: int8 quantization is for onnxruntime on CPU (`medico-peft export onnx "
                          "--quantize int8`), not TensorRT; build engines from an fp32 export (--precision fp32/fp16/bf16)")

    prepare_output_dir(args.out, args.overwrite)
    meta = build_engines(args.onnx, args.out, precision=args.precision, max_points=args.max_points,
                         workspace_gb=args.workspace_gb, timing_cache=args.timing_cache, atol=args.atol)
    engines = ", ".join(f"{part}.engine" for part in meta["engines"])
    print(f"wrote {args.out}/{engines}, engine.json (TensorRT {meta['tensorrt_version']}, "
          f"{meta['gpu_name']}, {args.precision}); parity vs onnxruntime: {meta['parity']['max']}")
    return 0
