"""The demo's figures as a results file: runs `medico-peft demo` in this process and writes its report,
whole, under the shared header to benchmarks/results/demo.md.

    python benchmarks/bench_demo.py                          # -> benchmarks/results/demo.md
    python benchmarks/bench_demo.py --minutes 2 --results /tmp/demo.md   # quick check
Any option the demo takes (--minutes, --max-slices, --clicks, --lr, --rank, --blocks, ...) passes through.
The demo's folder (--work, default benchmarks/work/demo: images, adapter, per-object CSVs) is made fresh
each run; a folder that this script did not create is refused, never deleted (an empty one is used: nothing is lost).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

try:
    from benchmarks._results import Results, weights_source
except ImportError:  # run as `python benchmarks/bench_demo.py`
    from _results import Results, weights_source

HERE = Path(__file__).resolve().parent
MARKER = ".written-by-bench_demo"


def relink(report: str, work: Path, results: Path) -> str:
    """Relative links in report.md point into the demo folder; make them point there from the results file.
    Paths are made absolute without resolving symlinks: a work folder reached through a link (a benchmarks/work
    shared between checkouts) keeps links that hold inside the repository."""
    def fix(m):
        target = m.group(2)
        if re.match(r"[a-z]+:|/|#", target):
            return m.group(0)
        link = os.path.relpath(os.path.abspath(work / target), os.path.dirname(os.path.abspath(results)))
        return f"{m.group(1)}({Path(link).as_posix()})"
    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(HERE / "results" / "demo.md"), help="results file to write")
    ap.add_argument("--work", default="benchmarks/work/demo", help="the demo's output folder (made fresh)")
    args, demo_args = ap.parse_known_args(argv)
    record = Results("Demo: LiteMedSAM zero-shot, decoder-only and LoRA on MNI152 grey/white matter (CPU)",
                     argv=None if argv is None else [__file__, *argv])
    work = Path(args.work)
    if work.is_dir() and not any(work.iterdir()):  # empty (a run stopped before the demo wrote anything)
        work.rmdir()
    if work.exists():
        if not (work / MARKER).exists():
            print(f"error: {work}: exists and was not written by bench_demo.py; expected a new folder "
                  "(choose another --work)", file=sys.stderr)
            return 2
        shutil.rmtree(work)
    from medico_peft import cli

    try:
        rc = cli.main(["demo", "--out", str(work), *demo_args])
    finally:
        if work.is_dir():
            (work / MARKER).write_text("made by benchmarks/bench_demo.py; deleted by its next run\n")
    if rc:
        return rc
    report = (work / "report.md").read_text()
    report = re.sub(r"\A# .*\n+", "", report)  # the header carries the title
    results = Path(args.results)
    intro = (f"Written by this run of `medico-peft demo --out {work}` (options above); below is its "
             f"`report.md`, whole, with links pointing into {work}/. Model: {weights_source('litemedsam')}.\n\n")
    record.write(results, intro + relink(report, work, results))
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
