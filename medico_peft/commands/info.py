"""`medico-peft info`: a model, its parameters per submodule and what a PEFT method would train.

Also home of the PEFT command-line options (`add_peft_arguments`, `peft_config_from_args`) so every
subcommand that injects adapters spells them the same way. Only argparse at import time.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = "litemedsam") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help=f"model name: litemedsam (real weights), vit_b, vit_l, vit_h, "
                                                    f"vit_tiny (random weights without --checkpoint); default {default}")
    g.add_argument("--checkpoint", help="SAM/MedSAM/LiteMedSAM checkpoint (.pth or .safetensors)")
    g.add_argument("--img-size", type=int, help="input size for ViT models (multiple of 16)")


def add_peft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PEFT (see medico_peft.tuners.PeftConfig)")
    g.add_argument("--method", help="lora | dora | adapter | decoder_only | full")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank)")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(rank)")
    g.add_argument("--targets", default="q,v", help="comma list of q, k, v, qkv, proj, mlp (default q,v)")
    g.add_argument("--blocks", default="all", help="'all', N (last N blocks) or a comma list of indices ('3,' = block 3)")
    g.add_argument("--freeze-decoder", action="store_true", help="do not train the mask decoder")
    g.add_argument("--train-prompt-encoder", action="store_true")
    g.add_argument("--decoder-lora", action="store_true", help="LoRA on the mask decoder instead of training it fully")
    g.add_argument("--adapter-kind", default="parallel", help="parallel (AdaptFormer) | sequential (Houlsby)")
    g.add_argument("--bottleneck", type=int, default=64)
    g.add_argument("--activation", default="relu", help="relu | gelu")
    g.add_argument("--adapter-scale", type=float, default=0.1)


def parse_blocks(text: str):
    text = text.strip()
    if text == "all":
        return "all"
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(f"--blocks: expected 'all', N or a comma list of indices, got {text!r}") from None


def peft_config_from_args(args):
    """A validated PeftConfig from the options above, or None when --method is not given."""
    if not args.method:
        return None
    from ..tuners import PeftConfig

    return PeftConfig(method=args.method, rank=args.rank, alpha=args.alpha if args.alpha is not None else float(args.rank),
                      dropout=args.dropout, use_rslora=args.rslora, targets=args.targets,
                      blocks=parse_blocks(args.blocks), train_decoder=not args.freeze_decoder,
                      train_prompt_encoder=args.train_prompt_encoder, decoder_lora=args.decoder_lora,
                      adapter_kind=args.adapter_kind, bottleneck=args.bottleneck, activation=args.activation,
                      adapter_scale=args.adapter_scale)


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="model summary and parameter report (optionally with a PEFT method)",
                              description="Without --method every parameter counts as trainable (full finetuning).")
    add_model_arguments(p)
    add_peft_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    cfg = peft_config_from_args(args)  # validate options before loading anything
    from ..models import load_model
    from ..tuners import format_report, inject, parameter_report

    model = load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    if cfg is not None:
        inject(model, cfg)
    rows = parameter_report(model)
    total = rows[-1]
    if args.json:
        print(json.dumps({"model": model.spec.name, "img_size": model.img_size, "base_sha256": model.base_sha256,
                          "source": model.base_source, "peft_config": cfg.to_dict() if cfg else None,
                          "report": [r._asdict() for r in rows], "trainable_share": total.share}, indent=2))
        return 0
    print(f"model       {model.spec.name} ({model.spec.family}), input {model.img_size}x{model.img_size}")
    print(f"weights     {model.base_source}")
    print(f"sha256      {model.base_sha256}")
    print(f"method      {cfg.method if cfg else 'none (all parameters trainable)'}")
    if cfg is not None:
        print(f"config      {json.dumps(cfg.to_dict())}")
    print()
    print(format_report(rows))
    print(f"\ntrainable: {total.trainable:,} of {total.total:,} parameters ({100 * total.share:.3f}%)")
    return 0
