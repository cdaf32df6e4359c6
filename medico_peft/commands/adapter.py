"""`medico-peft adapter inspect|merge|export|import`: look inside adapter files; fold LoRA into a plain SAM
checkpoint; write/read HF peft directories (for official SAM or transformers' SamModel)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ._options import add_model_arguments


EXPORT_FORMATS = ("peft", "peft-hf")


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

    exp = sub.add_parser("export", help="write an adapter file as an HF peft directory",
                         description="peft: module names of official segment_anything; peft-hf: module names of "
                                     "transformers.SamModel (PeftModel.from_pretrained(SamModel(config), DIR)).")
    exp.add_argument("--adapter", required=True, help="adapter .safetensors")
    add_model_arguments(exp, default=None, default_note="the adapter's base")
    exp.add_argument("--format", choices=EXPORT_FORMATS, default="peft", help="directory layout (default peft)")
    exp.add_argument("--out", required=True, help="output folder (adapter_config.json + adapter_model.safetensors)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    exp.add_argument("--force", action="store_true", help="apply the adapter even if the base sha256 differs")
    exp.set_defaults(handler=run_export)

    imp = sub.add_parser("import", help="turn an HF peft directory into an adapter file",
                         description="The naming is detected: directories written by `adapter export`, LoRA/DoRA "
                                     "trained by stock peft on transformers.SamModel (vision_encoder.*), ... "
                                     "The base (--model/--checkpoint; a SamModel folder works too) must be the "
                                     "weights the adapter was trained on.")
    imp.add_argument("directory", help="peft adapter directory")
    add_model_arguments(imp, default=None, default_note="none: give --model or --checkpoint")
    imp.add_argument("--format", choices=("auto",) + EXPORT_FORMATS, default="auto",
                     help="module naming of the directory (default: detected)")
    imp.add_argument("--out", required=True, help="adapter .safetensors to write")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    imp.add_argument("--tolerance", type=float, default=1e-4,
                     help="refuse if the probe outputs differ from the foreign adapter folded in (default 1e-4)")
    imp.add_argument("--force", action="store_true", help="(our own exports) ignore a base sha256 mismatch")
    imp.set_defaults(handler=run_import)


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
    from ..adapters import load_adapter
    from ..adapters.merge_file import load_adapter_base
    from ..utils.paths import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite)
    model = load_adapter(load_adapter_base(args.adapter, args.model, args.checkpoint, args.img_size), args.adapter,
                         force=args.force)
    if args.format == "peft-hf":
        from ..adapters.hf_transformers import export_peft_hf_dir

        export_peft_hf_dir(model, args.out)
    else:
        from ..adapters import export_peft_dir

        export_peft_dir(model, args.out)
    print(f"wrote {args.out} ({args.format})")
    return 0


def run_import(args) -> int:
    from ..models import load_model
    from ..utils.paths import prepare_output_file

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out: {out} must end in .safetensors")
    prepare_output_file(out, args.overwrite)
    if not args.model and not args.checkpoint:
        raise ConfigError("--model or --checkpoint: give the base the adapter was trained on")
    from ..adapters.hf_transformers import looks_like_hf_sam_peft, read_peft_dir

    fmt = args.format
    if fmt == "auto":
        _, raw, tensors = read_peft_dir(args.directory)
        fmt = "peft" if "medico_peft.config" in raw and raw.get("medico_peft.source") != "export_peft_hf_dir" \
            else "peft-hf" if looks_like_hf_sam_peft(tensors) else "peft"
    base = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if fmt == "peft-hf":
        from ..adapters.hf_transformers import import_peft_hf_to_file

        _, diff = import_peft_hf_to_file(base, args.directory, out, tolerance=args.tolerance)
        print(f"transformers.SamModel naming; probe max abs difference {diff:.3g}")
    else:
        from ..adapters import import_peft_dir, save_adapter

        save_adapter(import_peft_dir(base, args.directory, force=args.force), out,
                     extra_metadata={"imported_from": str(args.directory)})
    print(f"wrote {out}")
    return 0
