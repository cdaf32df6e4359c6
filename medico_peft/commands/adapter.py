"""`medico-peft adapter inspect|merge`: look inside adapter files; fold LoRA into a plain SAM checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


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
    mer.add_argument("--model", help="base model name (default: the adapter's base)")
    mer.add_argument("--checkpoint", help="base checkpoint file")
    mer.add_argument("--img-size", type=int, help="base input size (ViT; default: the adapter's)")
    mer.add_argument("--out", required=True, help="merged checkpoint: .pth or .safetensors")
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
    from ..adapters import load_adapter, read_adapter
    from ..models import load_model, save_model
    from ..tuners import merge

    meta, _ = read_adapter(args.adapter)
    spec = meta["base_spec"]
    name = args.model or (None if args.checkpoint else spec["name"])
    img_size = args.img_size or (spec["img_size"] if spec.get("family") == "vit" else None)
    model = load_adapter(load_model(name, checkpoint=args.checkpoint, img_size=img_size), args.adapter,
                         force=args.force)
    merged = merge(model, strict=True)
    diff = max_output_difference(model, merged)
    print(f"max abs difference of merged vs unmerged low-res logits on a random image: {diff:.3g}")
    if not diff <= args.tolerance:
        raise ConfigError(f"--tolerance: merged outputs differ by {diff:.3g} > {args.tolerance:g}; nothing written")
    save_model(merged, out)
    print(f"wrote {out}")
    return 0


def max_output_difference(a, b, seed: int = 0) -> float:
    """Largest |difference| of two models' low-res mask logits for one random image and box."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = a.img_size
    image = torch.rand(1, 3, s, s, generator=g)
    box = torch.tensor([[0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]])
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(image, boxes=box)[0] - b(image, boxes=box)[0]).abs().max().item()
