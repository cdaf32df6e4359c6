"""`medico-peft adapter inspect|merge|export|import`: look inside adapter files; fold LoRA into a plain SAM
checkpoint; write an adapter in another tool's format (stock peft on official SAM or on transformers'
SamModel); turn another tool's adapter into ours."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ._options import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("adapter", help="inspect adapter files, merge LoRA adapters into a SAM checkpoint")
    sub = p.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)

    ins = sub.add_parser("inspect", help="print an adapter file's metadata and tensor counts")
    ins.add_argument("file", help="adapter .safetensors")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(handler=run_inspect)

    mer = sub.add_parser("merge", help="fold a LoRA/DoRA adapter into the base weights and write a plain checkpoint",
                         description="The base defaults to the model recorded in the adapter (name and input size); "
                                     "its sha256 must match the adapter's unless --force.")
    mer.add_argument("--adapter", required=True, help="adapter .safetensors")
    add_model_arguments(mer, default=None, default_note="the adapter's base")
    mer.add_argument("--out", required=True, help="merged checkpoint: .pth (official segment_anything layout; "
                          "only at the official input size, 1024 for vit_b/l/h) or .safetensors (any size)")
    mer.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    mer.add_argument("--force", action="store_true", help="apply the adapter even if the base sha256 differs")
    mer.add_argument("--tolerance", type=float, default=1e-3,
                     help="refuse to write if merged and unmerged outputs differ by more (default 1e-3)")
    mer.set_defaults(handler=run_merge)

    exp = sub.add_parser("export", help="write an adapter in another tool's format (peft: stock peft on official SAM; "
                                        "peft-hf: stock peft on transformers.SamModel)",
                         description="--format peft writes adapter_config.json + adapter_model.safetensors with official "
                                     "segment_anything module names (LiteMedSAM: its own TinyViT names); stock "
                                     "peft.PeftModel.from_pretrained loads it onto the plain base. Checked against stock "
                                     "peft before it is written. --format peft-hf uses transformers.SamModel names "
                                     "(PeftModel.from_pretrained(SamModel(config), DIR)). LoRA/DoRA only: peft has no "
                                     "bottleneck adapters.")
    exp.add_argument("--adapter", required=True, help="adapter .safetensors")
    exp.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS), help="target format")
    add_model_arguments(exp, default=None, default_note="the adapter's base")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    exp.add_argument("--force", action="store_true", help="apply the adapter even if the base sha256 differs")
    exp.add_argument("--tolerance", type=float, default=1e-4,
                     help="refuse to write if stock peft's outputs differ from ours by more (default 1e-4)")
    exp.set_defaults(handler=run_export)

    imp = sub.add_parser("import", help="turn a peft LoRA directory or a micro-sam LoRA checkpoint into an adapter file",
                         description="Maps the foreign adapter onto the base (--model/--checkpoint; a directory written "
                                     "by medico-peft defaults to its recorded base), checks its outputs on a probe image "
                                     "(against stock peft, or the micro-sam checkpoint's merged weights) and writes a "
                                     "medico_peft adapter file.")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--peft", help="peft adapter folder (adapter_config.json + adapter_model.safetensors): written by "
                                    "`adapter export`, or trained by stock peft on official SAM or on transformers' "
                                    "SamModel (naming detected; see --format)")
    src.add_argument("--micro-sam", dest="micro_sam", help="micro-sam / MedicoSAM LoRA checkpoint (.pt/.pth)")
    imp.add_argument("--format", choices=("auto", "peft", "peft-hf"), default="auto",
                     help="module naming of a --peft folder: official segment_anything (peft) or SamModel (peft-hf); "
                          "default detected")
    add_model_arguments(imp, default=None, default_note="recorded base of a medico-peft folder; else required")
    imp.add_argument("--out", required=True, help="adapter .safetensors to write")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    imp.add_argument("--force", action="store_true", help="import a medico-peft folder even if the base sha256 differs")
    imp.add_argument("--tolerance", type=float, default=1e-3,
                     help="refuse if the imported adapter's outputs differ from the reference by more (default 1e-3)")
    imp.set_defaults(handler=run_import)


def _export_peft(model, out, args) -> None:
    from ..adapters import export_peft_dir

    export_peft_dir(model, out, tolerance=args.tolerance)


def _export_peft_hf(model, out, args) -> None:
    from ..adapters.hf_transformers import export_peft_hf_dir

    export_peft_hf_dir(model, out)


# --format name -> writer(model with the adapter loaded, output folder, args)
EXPORT_FORMATS = {"peft": _export_peft, "peft-hf": _export_peft_hf}


def _peft_naming(args) -> str:
    """peft (official segment_anything / our own names) or peft-hf (transformers.SamModel names) for --peft."""
    if args.format != "auto":
        return args.format
    from ..adapters.hf_format import read_peft_dir
    from ..adapters.hf_transformers import looks_like_hf_sam_peft

    _, raw, tensors = read_peft_dir(Path(args.peft))
    if "medico_peft.config" in raw and raw.get("medico_peft.source") != "export_peft_hf_dir":
        return "peft"
    return "peft-hf" if looks_like_hf_sam_peft(tensors) else "peft"


def run_inspect(args) -> int:
    from ..adapters import inspect_adapter

    info = inspect_adapter(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


def run_merge(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".pth", ".safetensors"):
        raise ConfigError(f"--out: {out} must end in .pth or .safetensors")
    from ..utils.paths import prepare_output_file

    prepare_output_file(out, args.overwrite)
    from ..adapters.merge_file import merge_adapter_file
    from ..models import save_model

    merged, diff = merge_adapter_file(args.adapter, model=args.model, checkpoint=args.checkpoint,
                                      img_size=args.img_size, force=args.force, tolerance=args.tolerance)
    print(f"max abs difference of merged vs unmerged outputs on a random image: {diff:.3g}")
    save_model(merged, out)
    print(f"wrote {out}")
    return 0


def run_export(args) -> int:
    from ..utils.paths import prepare_output_dir

    out = prepare_output_dir(args.out, args.overwrite)
    from ..adapters import load_adapter
    from ..adapters.merge_file import load_adapter_base

    model = load_adapter(load_adapter_base(args.adapter, args.model, args.checkpoint, args.img_size), args.adapter,
                         force=args.force)
    EXPORT_FORMATS[args.format](model, out, args)
    print(f"wrote {out} ({args.format})")
    return 0


def _import_base(args):
    from ..models import load_model

    if args.model or args.checkpoint:
        return load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if args.peft:
        from ..adapters.hf_format import read_peft_dir

        _, raw, _ = read_peft_dir(Path(args.peft))
        if "medico_peft.base_spec" in raw:
            spec = json.loads(raw["medico_peft.base_spec"])
            return load_model(spec["name"], img_size=spec.get("img_size") if spec.get("family") == "vit" else None)
    raise ConfigError("--model/--checkpoint: give the base the adapter was trained on (this adapter records none)")


def run_import(args) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out: {out} must end in .safetensors (a medico_peft adapter file)")
    from ..utils.paths import prepare_output_file

    prepare_output_file(out, args.overwrite)
    from ..adapters import import_peft_dir, save_adapter
    from ..adapters.microsam import import_microsam_checkpoint

    if args.peft and _peft_naming(args) == "peft-hf":
        from ..adapters.hf_transformers import import_peft_hf_to_file

        if not args.model and not args.checkpoint:
            raise ConfigError("--model or --checkpoint: give the base the adapter was trained on")
        from ..models import load_model

        base = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
        _, diff = import_peft_hf_to_file(base, args.peft, out, tolerance=args.tolerance)
        print(f"transformers.SamModel naming; probe max abs difference {diff:.3g}")
        print(f"wrote {out}")
        return 0
    base = _import_base(args)
    if args.peft:
        model = import_peft_dir(base, args.peft, force=args.force, tolerance=args.tolerance)
    else:
        model = import_microsam_checkpoint(base, args.micro_sam, tolerance=args.tolerance)
    save_adapter(model, out, extra_metadata={"imported_from": str(args.peft or args.micro_sam),
                                             "imported_format": "peft" if args.peft else "micro-sam"})
    print(f"wrote {out}")
    return 0
