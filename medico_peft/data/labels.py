"""Label selection: keep / merge / rename label ids, by number or by name glob (e.g. 'Thalamus*').

Names come from a text file with one `id name [extra ...]` per line (the format of mricron's
`aal.nii.txt`). The result is a lookup table applied to every label slice.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

MAX_LABEL_ID = 65535


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Parse `id name ...` lines; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: label names file not found")
    names: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise DataError(f"{path}: line {lineno} should be 'id name ...', got {line!r}")
        names[int(parts[0])] = parts[1]
    if not names:
        raise DataError(f"{path}: no 'id name' lines found")
    return names


@dataclass
class LabelSelection:
    """What to do with label ids. `keep=None` keeps every id; patterns match names via glob."""

    keep: list | None = None  # ids (int) or name patterns (str)
    merge: dict = field(default_factory=dict)  # target (id or new name) -> list of ids/patterns
    rename: dict = field(default_factory=dict)  # id -> new name
    names_file: str | None = None

    def resolve(self, names: dict[int, str] | None = None) -> "LabelMap":
        """The lookup table; `names` ({id: name}, e.g. a manifest's label table) replaces `names_file`."""
        if names is None:
            names = read_label_names(self.names_file) if self.names_file else {}
        lut: dict[int, int] = {}
        out_names: dict[int, str] = {}
        if self.keep is not None:
            if not self.keep:
                raise ConfigError("labels.keep: empty list keeps nothing; use None to keep all labels")
            for item in self.keep:
                for i in _match(item, names, "labels.keep"):
                    lut[i] = i
                    out_names[i] = names.get(i, f"label_{i}")
        else:
            out_names.update(names)
        for target, sources in self.merge.items():
            ids = sorted({i for s in (sources if isinstance(sources, (list, tuple)) else [sources])
                          for i in _match(s, names, f"labels.merge[{target!r}]")})
            if isinstance(target, int) or str(target).isdigit():
                new_id, new_name = int(target), names.get(int(target), f"label_{int(target)}")
            else:
                new_id, new_name = ids[0], str(target)
            for i in ids:
                lut[i] = new_id
                out_names.pop(i, None)
            out_names[new_id] = new_name
        for key, name in self.rename.items():
            key = int(key)
            if key not in out_names and self.keep is not None:
                raise ConfigError(f"labels.rename: id {key} is not among the kept labels {sorted(out_names)}")
            out_names[key] = str(name)
        closed = self.keep is not None
        return LabelMap(lut=lut, names=out_names, closed=closed)


def _match(item, names: dict[int, str], field_name: str) -> list[int]:
    if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit()):
        value = int(item)
        if not 0 < value <= MAX_LABEL_ID:
            raise ConfigError(f"{field_name}: label id {value} outside 1..{MAX_LABEL_ID}")
        return [value]
    if not names:
        raise ConfigError(f"{field_name}: name pattern {item!r} needs a label names file (names_file)")
    hits = [i for i, n in sorted(names.items()) if fnmatch.fnmatchcase(n, str(item))]
    if not hits:
        raise ConfigError(f"{field_name}: pattern {item!r} matches no label name (e.g. {list(names.values())[:3]})")
    return hits


@dataclass
class LabelMap:
    """old id -> new id. `closed`: ids not in `lut` become 0; otherwise they pass through unchanged."""

    lut: dict[int, int]
    names: dict[int, str]
    closed: bool

    def apply(self, labels: np.ndarray) -> np.ndarray:
        if not self.lut and not self.closed:
            return labels
        top = int(labels.max(initial=0))
        size = max(top, max(self.lut, default=0)) + 1
        table = np.zeros(size, np.int64) if self.closed else np.arange(size, dtype=np.int64)
        for old, new in self.lut.items():
            table[old] = new
        return table[labels]


# ---------------------------------------------------------------- selection from text (CLI, recipes)


def parse_label_items(text: str | None) -> list | None:
    """'1,Thalamus*,5' -> [1, 'Thalamus*', 5]: comma-separated, numeric items become ids; None/'' -> None."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return [int(t) if t.isdigit() else t for t in items] or None


def _key_value(text: str, option: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{option}: {text!r} should look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def parse_label_selection(keep: str | None = None, merge=(), rename=(), names_file: str | None = None) -> LabelSelection:
    """A LabelSelection from text: keep 'ids,globs', merge ['TARGET=SRC1,SRC2'], rename ['ID=NAME']."""
    merges = {}
    for item in merge:
        target, sources = _key_value(item, "--merge")
        merges[int(target) if target.isdigit() else target] = parse_label_items(sources) or []
    pairs = [_key_value(r, "--rename") for r in rename]
    if not all(k.isdigit() for k, _ in pairs):
        raise ConfigError("--rename: keys must be numeric label ids (ID=NAME)")
    return LabelSelection(keep=parse_label_items(keep), merge=merges, rename={int(k): v for k, v in pairs},
                          names_file=names_file)
