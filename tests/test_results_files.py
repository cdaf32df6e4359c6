"""Results files are written whole by the benchmark scripts, and the README quotes only what they hold.

(a) Every file under benchmarks/results/ starts with the header of benchmarks/_results.py: title, the
    command as run (`python ...` or `medico-peft ...`, naming a script that exists), date, commit and
    machine (CPU, cores, load average).
(b) Every figure in README.md's `## Results` section occurs verbatim in some results file. The rule:
    - scope: the lines from `## Results` to the next `## ` heading; inline code spans (commands, paths)
      and link targets are removed first;
    - a number token is digits with optional thousands commas, decimal part and exponent (`4,117,732`,
      `0.764`, `5.5e-5`); a leading sign is ignored;
    - it is a *figure* when it has a decimal point or an exponent, or thousands commas, or is followed
      (optionally after a space) by `×`, `%` or a unit (s, ms, min, MB, MiB, GiB, samples/s, slices/s,
      steps), or is the whole of a table cell (after `~`, `**` and such a unit are stripped); the
      first number of a range `A–B unit` is a figure when B is;
    - configuration labels are not figures: a number right after a letter, `_`, `=` or `/`, or right
      before `²` or a letter (`r=8`, `w=64`, `vit_b`, `256²`, `MNI152`), and bare integers in prose
      (`10 held-out slices`, `4 clicks`);
    - a figure is found when the same token (sign dropped, commas as written) is a number token of any
      results file. Rounded copies (`0.52` for `0.521`) are not found: quote the file.
`make bench-check` (python -m benchmarks.run_all --check) runs this file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

HEADER = re.compile(
    r"\A# \S.*\n\n"
    r"- Command: `(?P<cmd>(?:python|medico-peft) [^`\n]+)`\n"
    r"- Date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC[^\n]*\n"
    r"- Commit: (?:[0-9a-f]{7,40}|unknown) \([^\n]+\)\n"
    r"- Machine: [^\n]+, \d+ cores, [^\n]*load average before [^\n]+\n")

NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?"
TOKEN = re.compile(rf"(?<![\w.]){NUM}(?![\d])")
UNIT = r"(?:×|%|samples/s|slices/s|items/s|ms\b|s\b|min\b|MB\b|MiB\b|GiB\b|GB\b|steps\b)"
CELL = re.compile(rf"^[~≈]?[-+−]?({NUM})\s*{UNIT}?$")


def header_problem(text: str) -> str | None:
    m = HEADER.match(text)
    if not m:
        first = text.splitlines()[:6]
        return "no results header (title, Command, Date, Commit, Machine lines) at the top; starts " + repr(first[:3])
    words = m.group("cmd").split()
    if words[0] == "python":
        target = words[1:3]
        script = (ROOT / target[1].replace(".", "/")).with_suffix(".py") if target[0] == "-m" else ROOT / target[0]
        if not script.is_file():
            return f"Command names {' '.join(target)}, which is not a script in this repository"
    return None


def test_every_results_file_starts_with_the_scripts_header():
    files = sorted(p for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files, f"{RESULTS}: no results files"
    bad = [f"{p.relative_to(ROOT)}: {problem}" for p in files if (problem := header_problem(p.read_text()))]
    assert not bad, ("results files not written (whole) by a benchmark script; rerun the script named in "
                     "benchmarks/run_all.py:\n  " + "\n  ".join(bad))


def results_section(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "## Results")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def _clean(line: str) -> str:
    line = re.sub(r"`[^`]*`", " ", line)  # commands and paths
    return re.sub(r"\]\([^)]*\)", "]", line)  # link targets


def figures(lines: list[str]) -> list[tuple[str, str]]:
    """(token, line) for every figure by the rule in the module docstring."""
    found = []
    for raw in lines:
        line = _clean(raw)
        if re.fullmatch(r"\s*\|?[\s|:-]*", line):
            continue
        if line.lstrip().startswith("|"):
            for cell in line.strip().strip("|").split("|"):
                m = CELL.match(cell.replace("*", "").strip())
                if m:
                    found.append((m.group(1), raw))
        for m in TOKEN.finditer(line):
            tok, before, after = m.group(0), line[:m.start()], line[m.end():]
            if re.search(r"[A-Za-z_=/]$", before) or re.match(r"²|[A-Za-z]", after) and not re.match(
                    rf"\s?{UNIT}", after):
                continue
            range_next = re.match(rf"\s?[–-]\s?{NUM}\s?{UNIT}", after)
            if ("." in tok or "e" in tok or "," in tok or re.match(rf"\s?{UNIT}", after) or range_next):
                found.append((tok, raw))
    return list(dict.fromkeys(found))


def results_tokens() -> set[str]:
    return {m.group(0) for p in RESULTS.iterdir() if p.is_file() for m in TOKEN.finditer(p.read_text())}


def test_every_figure_the_readme_quotes_is_in_a_results_file():
    section = results_section(README.read_text())
    known = results_tokens()
    missing = [f"{tok!r} in: {line.strip()[:110]}" for tok, line in figures(section) if tok not in known]
    links = {m for line in section for m in re.findall(r"\]\((benchmarks/results/[^)]+)\)", line)}
    missing += [f"linked results file {link} does not exist" for link in sorted(links) if not (ROOT / link).is_file()]
    assert not missing, ("README.md `## Results` quotes figures that no file under benchmarks/results/ holds "
                         "verbatim (rule: tests/test_results_files.py docstring):\n  " + "\n  ".join(missing))


def test_the_figure_rule():
    lines = ["| vit_b 512² | LoRA r=8 q,v | 0.54 | 636 | 4,117,732 | 16.84 MB | 1.45× | — |",
             "Zero-shot Dice 0.475 (box) after 153 steps (534 s), 10 held-out slices, 4 clicks, 850–1000 samples/s,"
             " `--steps 2`, [x](benchmarks/results/a1.md), MNI152, ≤ 5.5e-5, 20–25 %, 2-core."]
    toks = [t for t, _ in figures(lines)]
    assert toks == ["0.54", "636", "4,117,732", "16.84", "1.45", "0.475", "153", "534", "850", "1000", "5.5e-5", "20", "25"]


# ---- the header writer and the scripts that use it -------------------------------------------------------

@pytest.fixture
def results_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import _results

    return _results


def test_the_header_writer_passes_the_header_check(results_module, tmp_path):
    rec = results_module.Results("Some benchmark", argv=[str(ROOT / "benchmarks" / "bench_params.py"), "--x", "a b"])
    path = rec.write(tmp_path / "r.md", "| a | 1.5 |\n")
    text = path.read_text()
    assert header_problem(text) is None, text
    assert "- Command: `python benchmarks/bench_params.py --x 'a b'`" in text
    assert text.endswith("| a | 1.5 |\n")
    assert "load average before" in text and "cores" in text


def test_random_weights_are_stated(results_module):
    assert "RANDOM" in results_module.weights_source("vit_b")
    assert "real LiteMedSAM" in results_module.weights_source("litemedsam")


def test_demo_results_file_is_written_by_the_demo_run(results_module, tmp_path, monkeypatch):
    """bench_demo runs `medico-peft demo` and writes its report whole under the header, links fixed."""
    from benchmarks import bench_demo
    from medico_peft import cli

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "report.md").write_text("# demo\n\n| **zero-shot** | **all** | **0.475** |\n\n![c](curve.png)\n"
                                       "153 steps in 534 s\n")
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    work, results = tmp_path / "work", tmp_path / "res" / "demo.md"
    assert bench_demo.main(["--work", str(work), "--results", str(results), "--minutes", "1"]) == 0
    assert seen["argv"] == ["demo", "--out", str(work), "--minutes", "1"]
    text = results.read_text()
    assert header_problem(text) is None, text
    assert "**0.475**" in text and "153 steps in 534 s" in text and "](../work/curve.png)" in text
    assert bench_demo.main(["--work", str(work), "--results", str(results)]) == 0  # its own folder: remade
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("a user's file")
    assert bench_demo.main(["--work", str(other), "--results", str(results)]) == 2  # not its folder: refused
    assert (other / "notes.txt").read_text() == "a user's file"
    empty = tmp_path / "empty"
    empty.mkdir()  # what a run stopped before the demo wrote anything leaves: nothing to lose, so used
    assert bench_demo.main(["--work", str(empty), "--results", str(results)]) == 0
    # a work folder reached through a symlink (benchmarks/work shared with another checkout): the link goes
    # through the symlink, as the repository sees it, not to where the link points
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "res" / "work").symlink_to(elsewhere, target_is_directory=True)
    linked = tmp_path / "res" / "work" / "demo"
    assert bench_demo.main(["--work", str(linked), "--results", str(results)]) == 0
    assert "](work/demo/curve.png)" in results.read_text()


def test_bench_check_entry_point_runs_this_file():
    sys.path.insert(0, str(ROOT))
    from benchmarks import run_all

    assert run_all.CHECK[-1] == "tests/test_results_files.py"
    assert "bench-check:" in (ROOT / "Makefile").read_text()
