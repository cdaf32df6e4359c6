"""The two real-data tasks the quality benchmarks train and score on (bench_clicks, bench_realdata).

Both use the library's slab split (data/real_data.py: train = lowest 50 % of the labelled axial extent, val the
next 15 %, test the highest 30 %, 5-slice gaps), at 256²:
  - mni152: nilearn's MNI152 template, grey and white matter (the demo's task);
  - colin27: Debian mricron-data's Colin27 T1 + AAL atlas, every labelled structure (hemispheres separate).
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("mni152", "colin27")


def build_shards(task: str, out: Path, compression: str | None = None) -> Path:
    """Write the task's shards under `out`; returns the manifest path."""
    from medico_peft.data.real_data import build_colin27_aal_shards, build_mni152_shards
    from medico_peft.workflows.demo import MNI152_TISSUES_DEMO

    options = {} if compression is None else {"compression": compression}  # lossless: the figures do not change
    if task == "mni152":
        report = build_mni152_shards(out, size=256, tissues=MNI152_TISSUES_DEMO, **options)
    elif task == "colin27":
        report = build_colin27_aal_shards(out, size=256, **options)
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return Path(report.manifest_path)
