"""``cdc-sync demo``: it runs the whole job, and deletes only a directory it made itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cdc_sync.demo import MARKER


def demo(directory: Path) -> subprocess.CompletedProcess[str]:
    """Run the demo in a child process, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "cdc_sync.cli", "demo", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_directory_the_demo_did_not_make_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A non-empty directory without the demo's marker is neither deleted nor written."""
    production = tmp_path / "cdc-sync"
    production.mkdir()
    (production / "state.db").write_bytes(b"precious")

    result = demo(production)

    assert result.returncode == 2
    assert "was not made by the demo" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in production.iterdir()] == ["state.db"]
    assert (production / "state.db").read_bytes() == b"precious"


def test_the_demo_runs_again_in_the_directory_it_made(tmp_path: Path) -> None:
    """A second run replaces the demo's own directory and pushes the same users again."""
    workdir = tmp_path / "demo"

    first = demo(workdir)
    (workdir / "leftover").write_text("from the first run")
    second = demo(workdir)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert (workdir / MARKER).is_file()
    assert not (workdir / "leftover").exists()
    assert "EngageLab accepted 10 requests" in second.stdout


def test_an_empty_directory_is_used_and_marked(tmp_path: Path) -> None:
    """An empty existing directory is the demo's to use, and becomes the demo's own."""
    result = demo(tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / MARKER).is_file()
    assert (tmp_path / "state.db").is_file()
