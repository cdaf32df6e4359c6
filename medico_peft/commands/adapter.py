"""`medico-peft adapter inspect|merge`: look inside adapter files; fold LoRA into a plain SAM checkpoint."""

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
