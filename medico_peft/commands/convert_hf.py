"""`medico-peft convert-hf to-hf|from-hf`: a SAM checkpoint <-> a transformers `SamModel.save_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ._options import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("convert-hf", help="convert SAM checkpoints to/from a transformers SamModel folder",
                              description="ViT models only (vit_b/l/h): transformers has no TinyViT SAM.")
    sub = p.add_subparsers(dest="convert_hf_command", metavar="DIRECTION", required=True)

    to = sub.add_parser("to-hf", help="checkpoint (+ optional LoRA adapter, merged) -> SamModel folder")
    add_model_arguments(to, default=None, default_note="detected from --checkpoint")
    to.add_argument("--adapter", help="LoRA/DoRA adapter .safetensors to merge first")
    to.add_argument("--force", action="store_true", help="apply --adapter even if the base sha256 differs")
    to.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    to.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    to.set_defaults(handler=run_to_hf)

    back = sub.add_parser("from-hf", help="SamModel folder -> checkpoint (.pth official layout, or .safetensors)")
    back.add_argument("directory", help="folder written by SamModel.save_pretrained (or to-hf)")
    back.add_argument("--out", required=True, help=".pth or .safetensors")
    back.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    back.set_defaults(handler=run_from_hf)


def run_to_hf(args) -> int:
    from ..models import load_model
    from ..models.hf_sam import write_hf_folder
    from ..utils.paths import prepare_output_dir, staged_folder

    prepare_output_dir(args.out, args.overwrite)
    if args.adapter:
        from ..adapters.merge_file import merge_adapter_file

        model, diff = merge_adapter_file(args.adapter, model=args.model, checkpoint=args.checkpoint,
                                         img_size=args.img_size, force=args.force)
        print(f"merged {args.adapter} (max abs difference merged vs unmerged {diff:.3g})")
    else:
        if not args.model and not args.checkpoint:
            raise ConfigError("--model or --checkpoint: give the model to convert")
        model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    from ..models.hf_sam import hf_config_dict

    hf_config_dict(model.spec)  # refuses TinyViT before anything is written
    with staged_folder(args.out) as stage:
        write_hf_folder(model, stage)
    print(f"wrote {args.out} (transformers SamModel, {model.spec.name} at {model.img_size})")
    return 0


def run_from_hf(args) -> int:
    from ..models import save_model
    from ..models.hf_sam import load_hf_folder
    from ..utils.paths import prepare_output_file

    out = Path(args.out)
    if out.suffix not in (".pth", ".safetensors"):
        raise ConfigError(f"--out: {out} must end in .pth or .safetensors")
    prepare_output_file(out, args.overwrite)
    model = load_hf_folder(args.directory)
    save_model(model, out)
    print(f"wrote {out} ({model.spec.name} at {model.img_size})")
    return 0
