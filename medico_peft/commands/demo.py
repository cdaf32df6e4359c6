"""`medico-peft demo`: parse the options and run the demo workflow (medico_peft/workflows/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..workflows.demo import DEFAULT_MINUTES, demo_peft_config, run_demo
from ._options import add_peft_arguments, peft_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="MNI152 GM/WM: zero-shot LiteMedSAM vs decoder-only and LoRA finetunes on CPU, report",
        description="End-to-end CPU demo with shipped data and weights; --minutes bounds the whole run "
                    "(training gets what the evaluations leave, half decoder-only, half LoRA; each run "
                    "keeps the adapter of its best validation on the val slab).",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again into a non-empty --out folder (its shards are reused, the rest replaced)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"wall-clock budget of the whole demo (default {DEFAULT_MINUTES:g})")
    p.add_argument("--train-minutes", type=float, help="both training runs' budget together (default: what --minutes leaves)")
    p.add_argument("--max-slices", type=int, default=10, help="held-out slices evaluated (evenly spaced)")
    p.add_argument("--clicks", type=int, default=4, help="corrective clicks after the box")
    p.add_argument("--lr", type=float, default=5e-4)
    add_peft_arguments(p, only=("--rank", "--blocks"), defaults={"--blocks": "2"})
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.minutes <= 0:
        raise ConfigError(f"--minutes: {args.minutes} should be > 0")
    if args.max_slices < 1 or args.clicks < 0:
        raise ConfigError("--max-slices should be >= 1 and --clicks >= 0")
    peft = demo_peft_config(**peft_options(args))  # validate options before building anything
    from ..utils.paths import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite)
    report = run_demo(Path(args.out), args.minutes, args.train_minutes, args.max_slices, args.clicks, args.lr,
                      peft, progress=not args.no_progress, overwrite=args.overwrite)
    _say(f"done: {report}")
    return 0


