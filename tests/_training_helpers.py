"""Shared by the training tests: the tiny recipe with a per-test output folder (holds no tests)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def tiny_cfg(out_dir, *overrides):
    from medico_peft.training import TrainConfig

    return TrainConfig.from_yaml(TINY, overrides=[f"output.dir={out_dir}", "output.progress=false", *overrides])


# Columns of metrics.csv that measure this process (wall clock, memory), not the training: they differ
# between two identical runs and are left out when runs are compared. `cache_mb` is the feature cache's
# size in this process (a resumed process starts with an empty cache), i.e. a memory measurement too.
MEASURED_COLUMNS = frozenset({"epoch_seconds", "step_seconds", "process_peak_rss_mb", "cuda_peak_allocated_mb",
                              "cache_mb"})


def read_metrics_csv(path) -> tuple[list[str], list[dict]]:
    import csv

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def assert_same_metrics(got_path, want_path, atol: float = 1e-6) -> int:
    """Every row and every column of two metrics.csv files agree (numbers within `atol`, NaN == NaN),
    except the MEASURED_COLUMNS. Returns the number of values compared."""
    import math

    got_cols, got = read_metrics_csv(got_path)
    want_cols, want = read_metrics_csv(want_path)
    assert got_cols == want_cols, f"metrics.csv columns differ: {got_cols} vs {want_cols}"
    assert len(got) == len(want), f"metrics.csv has {len(got)} rows, the uninterrupted run {len(want)}"
    compared = 0
    for i, (a, b) in enumerate(zip(got, want)):
        for col in want_cols:
            if col in MEASURED_COLUMNS:
                continue
            x, y = a[col], b[col]
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                assert x == y, f"metrics.csv row {i} column {col}: {x!r} vs {y!r}"
                continue
            same = (math.isnan(fx) and math.isnan(fy)) or abs(fx - fy) <= atol
            assert same, f"metrics.csv row {i} column {col}: {fx!r} vs uninterrupted {fy!r}"
            compared += 1
    return compared


def assert_same_tensors(got: dict, want: dict, what: str, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensor names differ"
    for name in want:
        a, b = got[name], want[name]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {name} shape/dtype differ"
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert diff <= atol, f"{what}: {name} differs by {diff:g} (allowed {atol:g})"
