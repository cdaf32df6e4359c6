"""`medico-peft` command line.

Each subcommand lives in its own module under `medico_peft/commands/` and exposes
`register(subparsers)`; heavy imports (torch, peft, onnx) happen inside the handlers,
so `medico-peft --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__
from .errors import MedicoPeftError


def build_parser() -> argparse.ArgumentParser:
    from . import commands
    from .commands._options import CommandParser

    parser = CommandParser(
        prog="medico-peft",
        description="Parameter-efficient finetuning of Segment Anything on medical images.",
    )
    parser.add_argument("--version", action="version", version=f"medico-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        result = args.handler(args)
    except MedicoPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
