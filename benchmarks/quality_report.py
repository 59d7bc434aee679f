"""Provenance (command, date, commit, machine), Markdown tables and ``RESULTS.md`` sections for benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from freetickets_hub.artifact.files import write_text_atomic

__all__ = ["format_number", "markdown_table", "provenance", "provenance_lines", "replace_section", "write_results"]

REPO = Path(__file__).resolve().parents[1]


def provenance(started: float) -> dict[str, Any]:
    """What produced a result: the command line, UTC date, git commit and machine."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
    }


def provenance_lines(info: dict[str, Any], wall_time_s: float, training_s: float) -> list[str]:
    """Markdown bullets; ``training_s`` sums the training processes, whenever they ran (a rerun skips them)."""
    machine = info["machine"]
    device = machine["gpu"] or f"CPU only, {machine['cpu_count']} cores ({machine['cpu']})"
    return [
        f"- command: `{info['command']}`",
        f"- date: {info['date_utc']}; commit: `{info['commit']}`",
        f"- machine: {device}; torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"Python {machine['python']}; load average at start {machine['load_average_at_start']}",
        f"- wall time: {training_s / 60:.1f} min in training processes (summed over runs, as measured when they "
        f"ran); this invocation {wall_time_s / 60:.1f} min",
    ]


def format_number(value: Any, digits: int = 4) -> str:
    """A table cell: fixed decimals for floats, ``n/a`` for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(path: Path, key: str, text: str) -> None:
    """Put ``text`` between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` (appended if absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, new.lstrip())


def write_results(out: Path, results: dict[str, Any], markdown: str, results_md: str, section: str) -> list[str]:
    """``results.json`` and ``results.md`` into ``out``, and ``section`` of ``results_md`` unless it is ''.

    Returns what was written, for the benchmark's last line.
    """
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / "results.md", markdown)
    written = [str(out / "results.json"), str(out / "results.md")]
    if results_md:
        replace_section(Path(results_md), section, markdown)
        written.append(f"section {section} of {results_md}")
    return written
