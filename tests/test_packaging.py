"""What a production install carries: no emulator server, and no test code that needs one."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

TEST_ONLY = ("aiohttp", "pytest", "hypothesis", "trustme")


def requirements(extra: str | None) -> set[str]:
    """The distributions cdc-sync's installed metadata requires, with ``extra`` or without any."""
    found = set()
    for line in requires("cdc-sync") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or marker.evaluate({"extra": extra or ""}):
            found.add(requirement.name.lower())
    return found


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where no test-only package can be imported."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in TEST_ONLY)
    return subprocess.run(
        [sys.executable, "-c", f"import sys\n{blocked}{code}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_aiohttp_comes_only_with_the_emulator_extra() -> None:
    """`pip install cdc-sync` brings no aiohttp; `cdc-sync[emulator]` (and `[test]`) does."""
    assert "aiohttp" not in requirements(None)
    assert "aiohttp" in requirements("emulator")
    assert "aiohttp" in requirements("test")  # [test] includes [emulator]


def test_the_daemon_runs_without_test_only_packages() -> None:
    """The commands a daemon runs, and the shipped test helpers, import no test-only package."""
    result = python(
        "import cdc_sync.cli, cdc_sync.scheduler, cdc_sync.testing.postgres\n"
        "cdc_sync.cli.parser().parse_args(['status'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('cdc_sync')))\n"
    )

    assert result.returncode == 0, result.stderr
    assert "cdc_sync.emulator" not in result.stdout


def test_emulator_and_demo_without_the_extra_say_how_to_install_it() -> None:
    """Without aiohttp, `emulator` and `demo` exit 69 naming the extra, with no traceback."""
    for command in ("emulator", "demo"):
        result = python(
            f"from cdc_sync.cli import main\nraise SystemExit(main([{command!r}, '--help']))"
        )

        assert result.returncode == 69, result.stderr
        assert f"cdc-sync: {command} needs the EngageLab emulator" in result.stderr
        assert "pip install 'cdc-sync[emulator]'" in result.stderr
        assert "Traceback" not in result.stderr
