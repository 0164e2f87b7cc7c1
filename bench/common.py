"""What the benchmarks share: where the repository and the paper's CSVs are, a one-line machine
description, and the writer of bench/RESULTS.md sections (through the one atomic writer)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from actstore.io import write_atomic

__all__ = ["REPO", "PAPER_DATA", "PAPER_CSV", "RESULTS", "cpu_name", "machine",
           "update_results", "append_results", "md_table"]

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = REPO.parent / "shared" / "datasets" / "paper"
PAPER_CSV = PAPER_DATA / "world_place.csv"
RESULTS = REPO / "bench" / "RESULTS.md"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(load: bool = False) -> str:
    """CPU, cores, GPU, torch and Python versions (and the load average) in one line."""
    import torch  # deferred: only the benchmarks that report need it

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    text = (f"{cpu_name()}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    if load:
        try:
            text += f", load average {os.getloadavg()[0]:.1f}"
        except OSError:
            pass
    return text


def update_results(path: Path, section: str, text: str) -> None:
    """Replace (or append) the '## <section>' block of RESULTS.md; other sections untouched."""
    path = Path(path)                      # the CLIs pass --results as a string
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    out, skip = [], False
    for line in old.splitlines():
        if line.startswith("## "):
            skip = line.strip() == f"## {section}"
            if skip:
                continue
        if not skip:
            out.append(line)
    write_atomic(path, "\n".join(out).rstrip() + f"\n\n## {section}\n\n{text.strip()}\n")


def append_results(path: Path, text: str) -> None:
    """Append a block to RESULTS.md."""
    path = Path(path)                      # the CLIs pass --results as a string
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    write_atomic(path, old.rstrip() + "\n\n" + text.strip() + "\n")


def md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``cols`` = (key, header, format spec) per column."""
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[c[0]], c[2]) if c[0] in r else "" for c in cols) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])
