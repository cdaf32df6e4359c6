"""Evaluation reports split by object group (`visible` vs `cortical`, data/real_data.py object_group)."""

from __future__ import annotations

import pytest

from medico_peft.evaluation.interactive import EvalResult
from medico_peft.evaluation.report import group_means, summary_markdown


def _result(rows):
    names = sorted({r["label_name"] for r in rows})
    per_label = {n: [sum(r[f"dice_{i}"] for r in rows if r["label_name"] == n) /
                     sum(r["label_name"] == n for r in rows) for i in range(2)] for n in names}
    return EvalResult(start="box", n_clicks=1, split="test",
                      mean_dice=[sum(r[f"dice_{i}"] for r in rows) / len(rows) for i in range(2)],
                      per_label=per_label, label_counts={n: sum(r["label_name"] == n for r in rows) for n in names},
                      rows=rows, n_slices=2, seconds=1.0)


def _row(name, d0, d1):
    return {"label_name": name, "dice_0": d0, "dice_1": d1}


def test_group_means_average_objects_of_each_group():
    result = _result([_row("Thalamus_L", 0.8, 0.9), _row("Cerebelum_6_R", 0.6, 0.7), _row("Precentral_L", 0.4, 0.5),
                      _row("csf", 0.2, 0.3), _row("liver", 0.0, 0.0)])
    groups = group_means(result)
    assert list(groups) == ["visible", "cortical"]  # "liver" belongs to neither and is left out
    assert groups["visible"]["n"] == 3 and groups["visible"]["mean_dice"] == pytest.approx([1.6 / 3, 1.9 / 3])
    assert groups["cortical"] == {"n": 1, "mean_dice": pytest.approx([0.4, 0.5])}
    text = summary_markdown(result)
    assert "| *visible objects (mean)* | 3 | *0.533* | *0.633* |" in text
    assert "| *cortical objects (mean)* | 1 | *0.400* | *0.500* |" in text
    custom = group_means(result, group_of=lambda name: "all" if name != "liver" else None)
    assert custom == {"all": {"n": 4, "mean_dice": pytest.approx([0.5, 0.6])}}


def test_no_group_rows_for_data_of_other_names():
    result = _result([_row("liver", 0.5, 0.6), _row("spleen", 0.7, 0.8)])
    assert group_means(result) == {} and "objects (mean)" not in summary_markdown(result)
