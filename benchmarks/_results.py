"""The one writer of files under benchmarks/results/: every file starts with the same header.

    run = Results("Trainable parameters ...")   # at start: records date and load average before
    ...measure...
    run.write(out_path, body)                   # header + body, written whole (atomically)

Header (checked by tests/test_results_files.py):

    # <title>

    - Command: `python benchmarks/bench_x.py --flag value`   (sys.argv as run, shell-quoted)
    - Date: <UTC start time> (<seconds> s wall clock)
    - Commit: <sha> (<clean | dirty: N files changed outside benchmarks/results/>)
    - Machine: <CPU model>, <N> cores, torch threads <T>, Python x, torch y[, GPU]; load average
      before <a> / after <b> (1-min; above <N> other jobs shared the CPU)

Everything below the header is text the calling script emits; nothing is added by hand.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
HEADER_FIELDS = ("Command", "Date", "Commit", "Machine")


def command_line(argv: list[str] | None = None) -> str:
    """`python <script or -m module> <args>` (or `medico-peft ...`), shell-quoted, paths relative to the repo."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if argv and argv[0].endswith("medico-peft"):
        return shlex.join(["medico-peft", *argv[1:]])
    if spec is not None and spec.name and argv and Path(argv[0]).resolve() == Path(getattr(main, "__file__", "")).resolve():
        head = ["-m", spec.name.removesuffix(".__main__")]
    else:
        first = argv[0] if argv else "?"
        try:
            first = os.path.relpath(Path(first).resolve(), ROOT) if Path(first).exists() else first
        except ValueError:  # another drive
            pass
        head = [first]
    return "python " + shlex.join([*head, *argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    """`<sha> (clean)` or `<sha> (dirty: N files changed outside benchmarks/results/)`; results files are
    excluded because regenerating them is what a benchmark run does."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    # gpu_check.sh sets this from .sent-commit, written only from a clean tree before the copy is sent. The copy's
    # own git metadata cannot be trusted: on the device machine it named an older HEAD and called the tree dirty.
    sent = os.environ.get("MEDICO_PEFT_SENT_COMMIT")
    if sent:
        return f"{sent} (clean; run on a copy of that commit's tree)"
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode:
            return "unknown (not a git checkout)"
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    changed = [line for line in status.stdout.splitlines() if line.strip()]
    state = "clean" if not changed else f"dirty: {len(changed)} files changed outside benchmarks/results/"
    return f"{sha.stdout.strip()} ({state})"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine(load_before: float | None, load_after: float | None) -> str:
    cores = os.cpu_count() or 0
    parts = [cpu_model(), f"{cores} cores"]
    try:
        import torch

        parts.append(f"torch threads {torch.get_num_threads()}")
        parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
    except ImportError:
        parts.append(f"Python {platform.python_version()}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    busy = [v for v in (load_before, load_after) if v is not None and v > cores]
    hint = ("other jobs were running, load above the core count" if busy
            else "no sign of other jobs, load at or below the core count")
    return (", ".join(parts) + f"; load average before {fmt(load_before)} / after {fmt(load_after)} "
            f"(1-min, {cores} cores: {hint})")


class Results:
    """Create at the start of a run (date, load before), `write` at the end (or after each step)."""

    def __init__(self, title: str, argv: list[str] | None = None):
        self.title = title
        self.command = command_line(argv)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.t0 = time.monotonic()
        self.load_before = load_average()
        self.commit = git_state()  # the code that runs is the code at start

    def header(self) -> str:
        date = f"{self.started.strftime('%Y-%m-%d %H:%M:%S')} UTC ({time.monotonic() - self.t0:.0f} s wall clock)"
        return "\n".join([
            f"# {self.title}", "",
            f"- Command: `{self.command}`",
            f"- Date: {date}",
            f"- Commit: {self.commit}",
            f"- Machine: {machine(self.load_before, load_average())}", "", ""])

    def write(self, path, body: str) -> Path:
        """Header + body, written atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.header() + body.strip("\n") + "\n")
        os.replace(tmp, path)
        return path


def weights_source(name: str, checkpoint=None) -> str:
    """What `load_model(name, checkpoint)` loads, in words for the results text."""
    if checkpoint is not None:
        return f"weights from `{checkpoint}`"
    if name == "litemedsam":
        return "real LiteMedSAM weights (shipped, sha256-checked)"
    return "RANDOM weights (seeded; no checkpoint given, so its figures say nothing about accuracy)"
