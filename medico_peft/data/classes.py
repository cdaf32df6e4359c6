"""The class table of semantic segmentation, from a shard set's label table.

A manifest maps label ids to names (`label_names`). Semantic training selects, merges and renames
those labels exactly as `convert` does (`data/labels.py`: ids or name globs such as 'Thalamus*'),
and numbers the resulting labels 1..C-1 in ascending order of their (new) id; class 0 is the
background and every label not selected. `ClassTable.apply` turns a label slice into class indices.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from .labels import LabelSelection

BACKGROUND = "background"


@dataclass(frozen=True)
class ClassTable:
    names: tuple  # class index -> name; names[0] == "background"
    source_ids: tuple  # class index -> tuple of label ids of the shards mapped to it (() for background)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def label_ids(self) -> list[int]:
        """Every shard label id that maps to a foreground class."""
        return sorted(i for ids in self.source_ids for i in ids)

    def lut(self, top: int) -> np.ndarray:
        table = np.zeros(max(top, max(self.label_ids, default=0)) + 1, np.int64)
        for cls, ids in enumerate(self.source_ids):
            for i in ids:
                table[i] = cls
        return table

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Label ids (any int array) → class indices (int64), unselected ids → 0."""
        labels = np.asarray(labels)
        return self.lut(int(labels.max(initial=0)))[labels.astype(np.int64)]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "source_ids": [list(ids) for ids in self.source_ids]}


def class_table(label_names: dict[int, str], keep=None, merge=None, rename=None, source: str = "manifest"
                ) -> ClassTable:
    """Resolve a selection against a label table ({id: name}). `keep=None` takes every label.

    Errors name the `semantic.*` key: an empty label table, a pattern or id that matches no label.
    """
    if not label_names:
        raise DataError(f"{source}: the manifest has no label table ('label_names' is empty); semantic "
                        "segmentation needs one to define its classes: convert with a label names file "
                        "(--label-names) or write label_names into the manifest")
    names = {int(k): str(v) for k, v in label_names.items()}
    merge = dict(merge or {})
    rename = {int(k): str(v) for k, v in (rename or {}).items()}
    if keep is not None:
        if isinstance(keep, (str, int)):
            keep = [keep]
        if not keep:
            raise ConfigError("semantic.classes: an empty list selects no class; omit it to use every label")
        for item in keep:
            if not _hits(item, names):
                raise ConfigError(f"semantic.classes: {item!r} matches no label of {source} "
                                  f"(labels: {_preview(names)})")
    for target, sources in merge.items():
        for item in sources if isinstance(sources, (list, tuple)) else [sources]:
            if not _hits(item, names):
                raise ConfigError(f"semantic.merge[{target!r}]: {item!r} matches no label of {source} "
                                  f"(labels: {_preview(names)})")
    selection = LabelSelection(keep=list(keep) if keep is not None else None, merge=merge, rename={})
    lmap = selection.resolve(names)
    groups: dict[int, list[int]] = {}
    for old, new in lmap.lut.items():
        if old in names:
            groups.setdefault(new, []).append(old)
    if keep is None:
        merged_away = set(lmap.lut)
        for i in names:
            if i not in merged_away:
                groups.setdefault(i, []).append(i)
    out_names = dict(lmap.names)
    for key, name in rename.items():
        if key not in groups:
            raise ConfigError(f"semantic.rename: id {key} is not a selected class id {sorted(groups)}")
        out_names[key] = name
    ordered = sorted(groups)
    if not ordered:
        raise ConfigError(f"semantic.classes: the selection leaves no class (labels: {_preview(names)})")
    cls_names = [BACKGROUND] + [out_names.get(i, names.get(i, f"label_{i}")) for i in ordered]
    dup = sorted({n for n in cls_names if cls_names.count(n) > 1})
    if dup:
        raise ConfigError(f"semantic: class name {dup[0]!r} is used by several classes; rename one "
                          "(semantic.rename)")
    return ClassTable(names=tuple(cls_names), source_ids=((),) + tuple(tuple(sorted(groups[i])) for i in ordered))


def _hits(item, names: dict[int, str]) -> list[int]:
    """Label ids of the table an id or a name glob selects."""
    if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit()):
        return [int(item)] if int(item) in names else []
    return [i for i, n in sorted(names.items()) if fnmatch.fnmatchcase(n, str(item))]


def _preview(names: dict[int, str], n: int = 6) -> str:
    items = [f"{i} {v}" for i, v in sorted(names.items())[:n]]
    return ", ".join(items) + (", ..." if len(names) > n else "")

