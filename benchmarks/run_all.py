"""Run every benchmark one after the other (`make bench`); each writes its own file under
benchmarks/results/ (header from benchmarks/_results.py), which the README quotes. Run on a quiet
machine: timings are side-by-side ratios within each script, but a busy neighbour still adds noise.

    python -m benchmarks.run_all [--quick]
    python -m benchmarks.run_all --check    # = make bench-check: results headers + README figures
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

FULL = [
    ["benchmarks/bench_params.py"],
    ["benchmarks/bench_data.py"],
    ["-m", "benchmarks.bench_export", "--models", "litemedsam", "vit_b", "--threads", "2", "--repeats", "5"],
    ["-m", "benchmarks.bench_quantize", "--threads", "2", "--repeats", "5", "--vit-b-size", "512"],
    ["benchmarks/bench_memory.py"],
    ["benchmarks/bench_step_time.py"],
    ["benchmarks/bench_hash.py"],
    ["-m", "benchmarks.bench_realdata", "--budgets", "steps", "time", "--lr-factors", "0.4", "1", "2"],
    ["benchmarks/bench_base_dtype.py", "--parts", "realdata"],
    ["benchmarks/bench_base_dtype.py", "--parts", "memory", "--sub-iterations", "1", "--variants", "0,1",
     "--out", "benchmarks/results/base_dtype_memory.md"],
    ["benchmarks/bench_demo.py"],
    ["benchmarks/bench_semantic.py"],
    ["benchmarks/bench_volumes.py"],
]
CHECK = ["-m", "pytest", "-q", "tests/test_results_files.py"]
QUICK = [
    ["benchmarks/bench_params.py", "--models", "litemedsam", "--out", "/tmp/params.md"],
    ["benchmarks/bench_data.py", "--quick", "--out", "/tmp/data.md"],
    ["-m", "benchmarks.bench_export", "--models", "litemedsam", "--repeats", "1", "--out", "/tmp/export.md"],
    ["-m", "benchmarks.bench_quantize", "--repeats", "1", "--vit-b-size", "0", "--out", "/tmp/quantize.md"],
    ["benchmarks/bench_hash.py", "--models", "vit_tiny", "--repeats", "1", "--out", "/tmp/hash.md"],
    ["benchmarks/bench_volumes.py", "--quick", "--out", "/tmp/volumes.md"],
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run, results to /tmp")
    ap.add_argument("--check", action="store_true",
                    help="run no benchmark; check every results file's header and that each README figure is in one")
    args = ap.parse_args()
    if args.check:
        return subprocess.call([sys.executable, *CHECK])
    for cmd in QUICK if args.quick else FULL:
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, *cmd])
        print(f"=== exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
