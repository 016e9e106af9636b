"""What a benchmark run found, and how it is shown: result rows, the machine, Markdown and JSON.

A :class:`Row` is one number against one target. Its ``result`` is PASS or FAIL when the row has
a target, ``info`` when it is context for another row, INCOMPLETE when the run that should produce
it was stopped at its deadline (a partial number proves nothing against the target), and ERROR
when the measurement itself broke.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, INFO, INCOMPLETE, ERROR = "PASS", "FAIL", "info", "INCOMPLETE", "ERROR"


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    key: str  # which measurement: a..f
    label: str
    shown: str  # the value as printed
    value: float | None = None  # the value as a number, for the JSON
    target: str = ""
    result: str = INFO


@dataclass
class Measurement:
    """What one measurement function returns: its rows, notes for the reader, raw details."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, str] = field(default_factory=dict)  # titled verbatim text (query plans)


def verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with ``fraction`` of the values at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# -- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit(repo: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def code_fingerprint(repo: Path) -> str:
    """A hash of cdc-sync's code and migrations, to notice edits made while the run was going."""
    digest = hashlib.sha256()
    for path in sorted([*repo.glob("cdc_sync/**/*.py"), *repo.glob("migrations/**/*.py")]):
        digest.update(str(path.relative_to(repo)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine(repo: Path) -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": _git_commit(repo),
        "load_average_at_start": os.getloadavg(),
    }


# -- rendering ---------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(info: dict[str, Any], settings: list[str], results: dict[str, Measurement]) -> str:
    m = info["machine"]
    memory = f", {m['memory_gib']:.1f} GiB RAM" if m["memory_gib"] else ""
    load_start = " ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    load_end = " ".join(f"{x:.2f}" for x in info["load_average_at_end"])
    lines = [
        "# cdc-sync benchmarks",
        "",
        f"- **Machine:** nproc {m['nproc']}, {m['cpu_model']}{memory}, Linux {m['kernel']}; "
        f"Python {m['python']}; {info.get('postgres', 'PostgreSQL ?')}",
        f"- **Code:** commit {m['commit']} (fingerprint of cdc_sync/ and migrations/: "
        f"{info['code_at_start']}); run {info['started']} UTC, took "
        f"{info['duration_s'] / 60:.1f} min",
        *(
            [
                "- **Warning:** cdc_sync/ or migrations/ changed while this run was going "
                f"(code {info['code_at_start']} at start, {info['code_at_end']} at end): rows "
                "may come from different versions of the code"
            ]
            if info["code_at_start"] != info["code_at_end"]
            else []
        ),
        f"- **Load average (1/5/15 min):** {load_start} at start, {load_end} at end "
        "(anything above 0 is other work sharing the cores)",
        *(f"- {line}" for line in settings),
        "",
        "| | measurement | value | target | result |",
        "|---|---|---|---|---|",
    ]
    for result in results.values():
        for row in result.rows:
            cells = (row.key, row.label, row.shown, row.target or "—", row.result)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [(key, note) for key, result in results.items() for note in result.notes]
    if notes:
        lines += ["", "## What was measured", ""]
        lines += [f"- **({key})** {note}" for key, note in notes]
    for result in results.values():
        for title, text in result.blocks.items():
            lines += ["", f"## {title}", "", "```text", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def as_json(info: dict[str, Any], results: dict[str, Measurement]) -> str:
    document = {
        **info,
        "rows": [asdict(row) for result in results.values() for row in result.rows],
        "notes": {key: result.notes for key, result in results.items()},
        "details": {key: result.details for key, result in results.items()},
        "blocks": {key: result.blocks for key, result in results.items()},
    }
    return json.dumps(document, indent=2, default=str) + "\n"
