"""`medico-peft info`: a model, its parameters per submodule and what a PEFT method would train."""

from __future__ import annotations

import json

from ._options import add_model_arguments, add_peft_arguments, peft_config_from_args


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
