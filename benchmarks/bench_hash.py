"""How long the base-weight hash takes: `check_base` computes it every time an adapter is loaded.

The hash is `medico_peft.utils.hashing.sha256_state_dict` over the plain model's state dict (what
`medico_peft.adapters.io.base_state_sha256` runs). Models are built locally with random weights
(the hash cost depends only on the number of bytes). Writes the whole results file.

    python benchmarks/bench_hash.py                                  # -> benchmarks/results/hash.md
    python benchmarks/bench_hash.py --models vit_tiny --repeats 1 --out /tmp/hash.md   # quick check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from medico_peft.models import build_model
from medico_peft.utils.hashing import sha256_state_dict

try:
    from benchmarks._results import Results
except ImportError:  # run as `python benchmarks/bench_hash.py`
    from _results import Results

ROOT = Path(__file__).resolve().parent.parent


def measure(name: str, repeats: int) -> dict:
    model = build_model(name, seed=0)
    state = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    times = []
    digest = None
    for _ in range(repeats):
        start = time.perf_counter()
        digest = sha256_state_dict(state)
        times.append(time.perf_counter() - start)
    del model, state
    med = statistics.median(times)
    return {"model": name, "params": params, "bytes": nbytes, "median_s": med, "min_s": min(times),
            "max_s": max(times), "gb_s": nbytes / med / 1e9, "sha256": digest, "repeats": repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["litemedsam", "vit_b", "vit_h"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hash.md"))
    args = ap.parse_args()
    record = Results("Base-weight hash time (check_base hashes the weights at every adapter load)")
    rows = []
    for name in args.models:
        print(f"{name} ...", flush=True)
        rows.append(measure(name, args.repeats))
        print(f"  {rows[-1]['median_s']:.2f} s", flush=True)
    lines = [
        "What is timed: `sha256_state_dict(model.state_dict())` on CPU (one thread: hashlib's sha256 is "
        "sequential), models built with random weights (`build_model(name, seed=0)`, default input size). "
        f"Median of {args.repeats} run(s).",
        "",
        "| model | parameters | state bytes | median s | min s | max s | GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['bytes']:,} | {r['median_s']:.2f} | {r['min_s']:.2f} "
                     f"| {r['max_s']:.2f} | {r['gb_s']:.2f} |")
    path = record.write(args.out, "\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
