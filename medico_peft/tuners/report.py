"""Parameter accounting: what is trained, per submodule, and the tensors an adapter file holds."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

SUBMODULES = ("image_encoder", "prompt_encoder", "mask_decoder")


class ReportRow(NamedTuple):
    submodule: str
    total: int
    trainable: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters that train (names as in `model.named_parameters()`)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_report(model: nn.Module) -> list[ReportRow]:
    """One row per SAM part (PEFT parameters count in the part they sit in), then a `total` row."""
    totals = {s: [0, 0] for s in SUBMODULES}
    other = [0, 0]
    for name, p in model.named_parameters():
        slot = totals.get(name.split(".", 1)[0], other)
        slot[0] += p.numel()
        slot[1] += p.numel() if p.requires_grad else 0
    rows = [ReportRow(s, *totals[s]) for s in SUBMODULES]
    if other[0]:
        rows.append(ReportRow("other", *other))
    rows.append(ReportRow("total", sum(r.total for r in rows), sum(r.trainable for r in rows)))
    return rows


def format_report(rows: list[ReportRow]) -> str:
    """Plain-text table used by `medico-peft info`."""
    lines = [f"{'submodule':<16}{'parameters':>14}{'trainable':>14}{'share':>9}"]
    for r in rows:
        lines.append(f"{r.submodule:<16}{r.total:>14,}{r.trainable:>14,}{100 * r.share:>8.2f}%")
    return "\n".join(lines)
