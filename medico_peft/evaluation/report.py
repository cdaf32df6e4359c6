"""Evaluation outputs: per-object CSV, markdown summary table, Dice-vs-clicks plot, overlay PNGs.

Every file is written through `atomic_path`, so an interrupted evaluation never leaves a
half-written report that looks finished. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Sequence


from ..utils.atomic import atomic_path, atomic_write_text
from ..utils.figures import pyplot, save_png
from ..utils.paths import staged_folder


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def step_names(n_clicks: int) -> list[str]:
    return ["start"] + [f"+{i}" for i in range(1, n_clicks + 1)]


def write_csv(rows: Sequence[dict], path) -> Path:
    """One line per row dict (per object: slice, label, area and Dice after each step; per click)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def group_means(result, group_of=None) -> dict[str, dict]:
    """Mean Dice per step over the objects of each group: {group: {"n": objects, "mean_dice": [...]}}.

    `group_of(label_name)` names an object's group or None (left out); the default is the built-in
    real-data grouping (`data.real_data.object_group`: `visible` vs `cortical`). Groups come out in
    order of first appearance in `OBJECT_GROUPS`, then alphabetically; empty when no object has one.
    """
    from ..data.real_data import OBJECT_GROUPS, object_group

    group_of = group_of or object_group
    steps = [f"dice_{i}" for i in range(result.n_clicks + 1)]
    members: dict[str, list[dict]] = {}
    for row in result.rows:
        group = group_of(row["label_name"])
        if group is not None:
            members.setdefault(group, []).append(row)
    order = sorted(members, key=lambda g: (OBJECT_GROUPS.index(g) if g in OBJECT_GROUPS else len(OBJECT_GROUPS), g))
    return {g: {"n": len(members[g]), "mean_dice": [sum(r[s] for r in members[g]) / len(members[g]) for s in steps]}
            for g in order}


def summary_markdown(result, title: str | None = None) -> str:
    """Table: per label mean Dice at the start prompt and after each click, then the overall mean."""
    steps = step_names(result.n_clicks)
    head = title or f"Interactive evaluation ({result.split} split, {result.start} start)"
    lines = [f"# {head}", "",
             f"{result.n_objects} objects on {result.n_slices} slices; start = one {result.start}"
             f"{' (tight)' if result.start == 'box' else ' at the object centre'}, then {result.n_clicks} "
             f"corrective clicks; Dice at model input resolution; {result.seconds:.0f} s.", "",
             "| label | n | " + " | ".join(steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    for name, values in result.per_label.items():
        lines.append(f"| {name} | {result.label_counts[name]} | " + " | ".join(_fmt(v) for v in values) + " |")
    for group, stats in group_means(result).items():
        lines.append(f"| *{group} objects (mean)* | {stats['n']} | "
                     + " | ".join(f"*{_fmt(v)}*" for v in stats["mean_dice"]) + " |")
    lines.append(f"| **overall (mean over objects)** | {result.n_objects} | "
                 + " | ".join(f"**{_fmt(v)}**" for v in result.mean_dice) + " |")
    response = click_response_markdown(result.click_rows)
    if response:
        lines += ["", "## How the clicks were answered (means over clicks; per_click.csv has every click)", "",
                  *response]
    return "\n".join(lines) + "\n"


def click_response_summary(click_rows: Sequence[dict]) -> list[dict]:
    """Per label and click kind, the means over clicks of `click_response`'s figures (in order of label name,
    then positive before negative): `n` clicks; `region_share` the clicked error region / all error;
    `fixed_raw` / `fixed_kept` the share of the clicked region the decoder's answer / the kept answer fixes;
    `broken_raw` / `broken_kept` right pixels elsewhere made wrong; `gain_raw` / `gain_kept` Dice change."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in click_rows:
        groups.setdefault((row["label_name"], row["kind"]), []).append(row)

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    out = []
    for (name, kind), rows in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != "positive")):
        region = [max(r["region_px"], 1) for r in rows]
        out.append({"label_name": name, "kind": kind, "n": len(rows),
                    "region_share": mean(r["region_px"] / max(r["error_px"], 1) for r in rows),
                    **{f"fixed_{a}": mean(r[f"fixed_{a}"] / n for r, n in zip(rows, region)) for a in ("raw", "kept")},
                    **{f"broken_{a}": mean(r[f"broken_{a}"] for r in rows) for a in ("raw", "kept")},
                    **{f"gain_{a}": mean(r[f"dice_{a}"] - r["dice_before"] for r in rows) for a in ("raw", "kept")}})
    return out


def click_response_markdown(click_rows: Sequence[dict]) -> list[str]:
    """`click_response_summary` as a markdown table (lines), with a line that says how to read it."""
    if not click_rows:
        return []
    lines = ["| label | click | n | clicked region / all error | region fixed: decoder | region fixed: kept "
             "| px broken elsewhere: decoder / kept | Dice change: decoder / kept |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in click_response_summary(click_rows):
        lines.append(f"| {s['label_name']} | {s['kind']} | {s['n']} | {_fmt(s['region_share'])} | "
                     f"{_fmt(s['fixed_raw'])} | {_fmt(s['fixed_kept'])} | {s['broken_raw']:.0f} / "
                     f"{s['broken_kept']:.0f} | {s['gain_raw']:+.3f} / {s['gain_kept']:+.3f} |")
    lines += ["", "Each click lands in one connected error region (what one perfect local click would fix); "
              "*region fixed* is the share of it the decoder's whole answer / the answer kept after the click "
              "merge gets right, *px broken elsewhere* the right pixels outside it that the answer makes wrong. "
              "A decoder that ignores clicks fixes little of the region; one that drifts breaks pixels elsewhere."]
    return lines


def plot_dice_curves(curves: dict[str, Sequence[float]], path, title: str = "Dice vs corrective clicks") -> Path:
    """One line per curve (x = clicks after the start prompt); used for labels and for model comparisons."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("corrective clicks (0 = start prompt)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def save_overlay(case, path) -> Path:
    """Two panels (start prompt | final): image, ground-truth contour (green), prediction (red), prompts."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4), dpi=100)
    start_points = 0 if case.box is not None else 1  # a point start shows its centre click
    panels = [(case.start_mask, f"start: Dice {case.dice_start:.3f}", start_points),
              (case.final_mask, f"after clicks: Dice {case.dice_final:.3f}", len(case.points))]
    for ax, (mask, label, n_points) in zip(axes, panels):
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=1)
        if case.gt.any():
            ax.contour(case.gt.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        if case.box is not None:
            x0, y0, x1, y1 = case.box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=0.8))
        for (x, y), lab in zip(case.points[:n_points], case.point_labels[:n_points]):
            if lab >= 0:
                ax.plot(x, y, marker="+" if lab == 1 else "x", color="cyan" if lab == 1 else "magenta",
                        markersize=7, mew=1.5)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(case.title + "  (green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


_EVAL_FILE = re.compile(
    r"^(per_object\.csv|per_click\.csv|dice_vs_clicks\.png|summary\.md|summary\.json|overlay_\d+\.png)$")


def write_eval_outputs(result, out_dir, title: str | None = None) -> dict[str, Path]:
    """All files of one evaluation into `out_dir`; their paths are recorded in `result.files`.

    They are written to a folder beside `out_dir` that replaces it in one swap at the end, so a
    previous evaluation there is never mixed with this one (other files in the folder are kept).
    """
    out = Path(out_dir)
    with staged_folder(out, owned=lambda name: bool(_EVAL_FILE.match(name))) as stage:
        files = {"per_object_csv": write_csv(result.rows, stage / "per_object.csv")}
        if result.click_rows:
            files["per_click_csv"] = write_csv(result.click_rows, stage / "per_click.csv")
        curves = {"overall": result.mean_dice}
        if len(result.per_label) <= 8:
            curves.update(result.per_label)
        files["dice_vs_clicks_png"] = plot_dice_curves(curves, stage / "dice_vs_clicks.png",
                                                       title=f"Dice vs clicks ({result.start} start)")
        for i, case in enumerate(result.cases):
            files[f"overlay_{i}"] = save_overlay(case, stage / f"overlay_{i:02d}.png")
        atomic_write_text(stage / "summary.md", summary_markdown(result, title))
        files["summary_md"] = stage / "summary.md"
        files = {key: out / path.name for key, path in files.items()}  # where they will be
        result.files = files
        result.out_dir = out
        atomic_write_text(stage / "summary.json",
                          json.dumps(result.to_dict() | {"per_group": group_means(result),
                                                      "files": {k: str(v) for k, v in files.items()}},
                                     indent=2) + "\n")
        files["summary_json"] = out / "summary.json"
    return files


def comparison_table(results: dict[str, object], after: int | None = None) -> str:
    """Markdown rows "model | start | after N clicks" for several EvalResults with the same protocol."""
    lines = []
    for name, res in results.items():
        n = res.n_clicks if after is None else min(after, res.n_clicks)
        lines.append(f"| {name} | {_fmt(res.mean_dice[0])} | {_fmt(res.mean_dice[n])} |")
    return "\n".join(lines)

