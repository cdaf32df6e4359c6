"""How the test clicks were answered, as the quality benchmarks report it (bench_realdata, bench_clicks).

Each evaluated model run gives `evaluation.report.click_response_summary` rows (per label and click kind: the share
of the clicked error region the decoder's answer / the kept answer fixes, pixels broken elsewhere, Dice change);
`answers_lines` merges a model's runs (seeds: mean of the runs' means, clicks summed) into one markdown table.
"""

from __future__ import annotations

import numpy as np

FIGURES = ("region_share", "fixed_raw", "fixed_kept", "broken_raw", "broken_kept", "gain_raw", "gain_kept")


def answers_lines(by_model: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown lines (explanation, table, blank line) for {model name: [one run's summary rows, ...]}; [] when no
    run has a click."""
    rows = []
    for name, runs in by_model.items():
        merged: dict[tuple[str, str], list[dict]] = {}
        for run in runs:
            for row in run:
                merged.setdefault((row["label_name"], row["kind"]), []).append(row)
        for (label, kind), mine in merged.items():
            f = {k: float(np.mean([r[k] for r in mine])) for k in FIGURES}
            rows.append(f"| {name} | {label} | {kind} | {sum(r['n'] for r in mine)} | {f['region_share']:.3f} "
                        f"| {f['fixed_raw']:.3f} | {f['fixed_kept']:.3f} | {f['broken_raw']:.0f} / "
                        f"{f['broken_kept']:.0f} | {f['gain_raw']:+.4f} / {f['gain_kept']:+.4f} |")
    if not rows:
        return []
    return ["How the test clicks were answered (`medico-peft evaluate` writes the same per click in per_click.csv): "
            "each click lands in one connected error region of its kind (false negatives for a positive click, false "
            "positives for a negative one), what one perfect local click would fix. *Region* = that region's share "
            "of all error; *fixed* = share of the region the decoder's whole answer / the answer kept after the "
            "click merge gets right; *broken* = right pixels elsewhere made wrong (decoder / kept); *Dice change* = "
            "per click (decoder / kept). Means over clicks, then over seeds.", "",
            "| model | label | click | clicks | region | fixed: decoder | fixed: kept | broken px | Dice change |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, ""]
