"""Comparing a file's tensors with what a model expects, for one precise error message."""

from __future__ import annotations


def describe_mismatch(found: dict, expected: dict) -> str | None:
    """None when keys and shapes agree; otherwise a short summary of missing/unexpected/wrong-shape keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: file {tuple(found[k].shape)}, "
                     f"model {tuple(expected[k].shape)})")
    return "; ".join(parts)
