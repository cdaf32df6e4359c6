"""Command-line options shared by the subcommands: the model to load and the PEFT method to inject.

PEFT options mirror `medico_peft.tuners.PeftConfig` fields: an option left out is not passed, so
the default is PeftConfig's (one default, one place), and its `--help` text is the field's `help`
metadata. That text is read when help is printed, not when the parser is built, because importing
the tuners imports torch and `medico-peft --help` must stay light. Only argparse at import time.
"""

from __future__ import annotations

import argparse


class CommandParser(argparse.ArgumentParser):
    """ArgumentParser whose actions may carry `deferred_help`: a callable giving the help text on demand."""

    def format_help(self) -> str:
        for action in self._actions:
            deferred = getattr(action, "deferred_help", None)
            if deferred is not None:
                action.help = deferred()
                action.deferred_help = None
        return super().format_help()


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = "litemedsam",
                        default_note: str | None = None) -> None:
    """--model, --checkpoint, --img-size. `default_note` describes a default that is not a model name."""
    note = default_note or default
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help=f"model name: litemedsam (real weights), vit_b, vit_l, vit_h, "
                                                    f"vit_tiny (random weights without --checkpoint); default {note}")
    g.add_argument("--checkpoint", help="SAM/MedSAM/LiteMedSAM checkpoint (.pth or .safetensors)")
    g.add_argument("--img-size", type=int, help=f"input size for ViT models (multiple of 16)"
                                                f"{'; default ' + default_note if default_note else ''}")


# flag -> (PeftConfig field, argparse keywords); store_const flags set the field to `const`.
PEFT_OPTIONS: dict[str, tuple[str, dict]] = {
    "--method": ("method", {}),
    "--rank": ("rank", {"type": int}),
    "--alpha": ("alpha", {"type": float}),
    "--dropout": ("dropout", {"type": float}),
    "--rslora": ("use_rslora", {"action": "store_const", "const": True}),
    "--init": ("init", {}),
    "--eva-batches": ("eva_batches", {"type": int}),
    "--targets": ("targets", {}),
    "--blocks": ("blocks", {}),
    "--freeze-decoder": ("train_decoder", {"action": "store_const", "const": False,
                                           "help": "do not train the mask decoder"}),
    "--train-prompt-encoder": ("train_prompt_encoder", {"action": "store_const", "const": True}),
    "--decoder-lora": ("decoder_lora", {"action": "store_const", "const": True}),
    "--adapter-kind": ("adapter_kind", {}),
    "--bottleneck": ("bottleneck", {"type": int}),
    "--activation": ("activation", {}),
    "--adapter-scale": ("adapter_scale", {"type": float}),
}


def _field_help(name: str, default_override=None):
    """Help text of a PeftConfig field, with its default (no default for --method: left out = no PEFT)."""
    def text() -> str:
        import dataclasses

        from ..tuners import PeftConfig

        f = next(f for f in dataclasses.fields(PeftConfig) if f.name == name)
        default = default_override if default_override is not None else f.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        if name == "method" or default is None or isinstance(default, bool) or f"default {shown}" in f.metadata.get("help", ""):
            return f.metadata.get("help", "")
        return f"{f.metadata.get('help', '')} (default {shown})"

    return text


def add_peft_arguments(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                       defaults: dict | None = None) -> None:
    """PEFT options (all, or the flags in `only`); `defaults` maps a flag to a command-specific default."""
    defaults = defaults or {}
    g = p.add_argument_group("PEFT (see medico_peft.tuners.PeftConfig)")
    for flag, (name, kwargs) in PEFT_OPTIONS.items():
        if only is not None and flag not in only:
            continue
        kwargs = dict(kwargs)
        fixed_help = kwargs.pop("help", None)
        action = g.add_argument(flag, dest=name, default=defaults.get(flag), help=fixed_help or f"PeftConfig.{name}",
                                **kwargs)
        if not fixed_help:
            action.deferred_help = _field_help(name, defaults.get(flag))


def peft_options(args) -> dict:
    """The PeftConfig fields given on the command line (options left out keep PeftConfig's defaults)."""
    names = [name for name, _ in PEFT_OPTIONS.values()]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def peft_config_from_args(args):
    """A validated PeftConfig from the options above, or None when --method is not given."""
    if not getattr(args, "method", None):
        return None
    from ..tuners import PeftConfig

    return PeftConfig(**peft_options(args))
