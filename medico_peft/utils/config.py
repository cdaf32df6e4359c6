"""One way to declare and validate a configuration: stdlib dataclasses whose fields carry metadata.

Every config in the package (`PeftConfig`, the training sections, `ConvertConfig`) declares its
fields with `option(...)` and calls `check_fields(self)` in `__post_init__`. The checker reads the
field's type hint and its metadata:

- `help`: one sentence (the CLI reuses it for `--help`);
- `choices`: the allowed values;
- `min` / `max` (inclusive) or `gt` / `lt` (exclusive) for numbers;
- `parse`: a function normalising the value (it raises `config_error(...)` itself);
- `error`: the message template (`{value!r}`, `{choices}`) for a value that fails the checks,
  for configs whose messages are part of their file format's documentation.

Ints refuse bools, floats accept ints and numeric strings (YAML reads `3e-4` as a string) and must
be finite, `X | None` allows None, `list[T]` checks every item. A failing value raises one
`ConfigError` naming the field, qualified by the active `field_prefix` (`optim.lr: ...`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from contextvars import ContextVar

from ..errors import ConfigError

_PREFIX: ContextVar[str] = ContextVar("medico_peft_config_prefix", default="")
_META_KEYS = ("help", "choices", "min", "max", "gt", "lt", "parse", "error")


def option(default=dataclasses.MISSING, *, help: str = "", choices=None, min=None, max=None, gt=None, lt=None,
           parse=None, error: str | None = None, default_factory=dataclasses.MISSING):
    """A dataclass field with validation metadata (see the module docstring)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "gt": gt, "lt": lt, "parse": parse, "error": error}
    meta = {k: v for k, v in meta.items() if v is not None and v != ""}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def field_help(cls, name: str) -> str:
    """The `help` text of one field of a config dataclass."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", "")


@contextlib.contextmanager
def field_prefix(prefix: str):
    """Qualify every field named in a ConfigError raised inside the block (`train` -> `train.epochs`)."""
    outer = _PREFIX.get()
    token = _PREFIX.set(f"{outer}.{prefix}" if outer and prefix else (prefix or outer))
    try:
        yield
    finally:
        _PREFIX.reset(token)


def qualified(name: str) -> str:
    prefix = _PREFIX.get()
    return f"{prefix}.{name}" if prefix else name


def config_error(name: str, message: str) -> ConfigError:
    """ConfigError `<prefix.name>: <message>`; configs raise these from `parse` functions and cross-checks."""
    return ConfigError(f"{qualified(name)}: {message}")


# ---------------------------------------------------------------- checking one value


def _type_noun(tp) -> str:
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}.get(tp, str(tp))


def _range_noun(tp, meta) -> str | None:
    """'a positive int', 'an int >= 0', 'a float in [0, 1)', ... ; None when the field has no bounds."""
    lo, lo_open = (meta["gt"], True) if "gt" in meta else (meta.get("min"), False)
    hi, hi_open = (meta["lt"], True) if "lt" in meta else (meta.get("max"), False)
    noun = _type_noun(tp)
    if lo is None and hi is None:
        return None
    if hi is None:
        if lo == 0 and lo_open or (tp is int and lo == 1 and not lo_open):
            return f"a positive {noun.split()[-1]}"
        return f"{noun} {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{noun} {'<' if hi_open else '<='} {hi:g}"
    return f"{noun} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _in_range(value, meta) -> bool:
    return not (("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"])
                or ("gt" in meta and value <= meta["gt"]) or ("lt" in meta and value >= meta["lt"]))


def _fail(name: str, meta: dict, value, default: str) -> ConfigError:
    choices = ", ".join(str(c) for c in meta.get("choices") or ())
    template = meta.get("error") or default
    return config_error(name, template.format(value=value, choices=choices))


def _coerce(value, tp, name: str, meta: dict):
    """`value` checked against annotation `tp` (see the module docstring for the rules)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], name, meta)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _fail(name, meta, value, "expected a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]", {}) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # free-form annotation (tuple, object, dict): the field's `parse` does the work
        return value
    raise _fail(name, meta, value, f"expected {_type_noun(tp)}, got {{value!r}}")


def check_value(name: str, value, tp, meta: dict):
    """The normalised value of one field, or a ConfigError naming it."""
    if "parse" in meta:
        return meta["parse"](value)
    value = _coerce(value, tp, name, meta)
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise _fail(name, meta, value, "expected one of {choices}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, meta):
        raise _fail(name, meta, value, f"expected {_range_noun(tp, meta)}, got {{value!r}}")
    return value


def check_fields(obj) -> None:
    """Validate and normalise every field of dataclass instance `obj` in place (frozen ones too)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = check_value(f.name, getattr(obj, f.name), hints[f.name], f.metadata)
        object.__setattr__(obj, f.name, value)


def from_mapping(cls, data, *, prefix: str = "", what: str = "config", sort_keys: bool = False):
    """`cls(**data)` for a mapping read from a file; unknown keys and bad values name `prefix.key`.

    Without a prefix, an unknown key is reported as `<what>: unknown key 'k'`. `sort_keys` lists the
    valid keys alphabetically instead of in field order.
    """
    label = prefix or what
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of keys, got {data!r}" if prefix else
                          f"{label}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    valid = ", ".join(sorted(names) if sort_keys else names)
    for key in data:
        if key not in names:
            if prefix:
                raise ConfigError(f"{prefix}.{key}: unknown key; valid keys: {valid}")
            raise ConfigError(f"{what}: unknown key {key!r}; valid keys: {valid}")
    with field_prefix(prefix):
        return cls(**data)
