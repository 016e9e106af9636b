"""Prometheus metrics: the observer's counts, a running daemon's /metrics checked by promtool,
the shipped alert rules checked by promtool and evaluated by a real Prometheus server."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_daemon import DEADLINE, POLL, cdc_sync, daemon, stderr_of, wait_until
from userdb import UserDb, write_config

from cdc_sync.cli import state_engine
from cdc_sync.emulator import EmulatorServer
from cdc_sync.engagelab import ApiResult, Verdict
from cdc_sync.metrics import Metrics, watermark_lag
from cdc_sync.outcomes import CycleCounts, CycleReport, PageReport, RowOutcome, RunOutcome
from cdc_sync.rules import Position, Status, Update
from cdc_sync.state import StateStore

RULES = Path(__file__).resolve().parent.parent / "prometheus" / "alerts.yml"
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


def sample(text: str, series: str) -> float | None:
    """The value of one series (``name{labels}`` exactly as exposed) in a scrape."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


def report(outcome: RunOutcome, **fields: Any) -> CycleReport:
    values: dict[str, Any] = {
        "sync": "users",
        "run_id": 1,
        "outcome": outcome,
        "counts": CycleCounts(),
        "watermark_before": None,
        "watermark_after": None,
        "started_at": NOW,
        "finished_at": NOW + timedelta(seconds=2),
    }
    return CycleReport(**(values | fields))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    state = StateStore(state_engine(f"sqlite:///{tmp_path}/s.db"), "users")
    state.migrate()
    yield state
    state.engine.dispose()


# -- the observer ---------------------------------------------------------------------------------


def test_metrics_count_pages_cycles_and_answers(store: StateStore) -> None:
    """Pages add rows and outcomes, cycles their outcome, duration and health, answers their
    time and error codes; every series carries the sync's name."""
    metrics = Metrics("users", store, 60.0, now=lambda: 1_700_000_000.0, process=False)
    value = metrics.registry.get_sample_value
    page = PageReport(
        "users",
        1,
        10,
        9,
        {RowOutcome.SYNCED: 7, RowOutcome.RETRYING: 2, RowOutcome.UNCHANGED: 1},
        CycleCounts(rows_read=10, synced=7, retrying=2, unchanged=1),
        False,
        None,
        True,
        40,
    )

    metrics.page_recorded(page)
    backlog = value("cdc_sync_backlog_rows", {"sync": "users"})
    metrics.answered(ApiResult(Verdict.SUCCESS, 0, 200, "success"), 0.02)
    metrics.answered(ApiResult(Verdict.TRANSIENT, -1, 500, "internal error"), 0.3)
    metrics.answered(ApiResult(Verdict.TRANSIENT, None, None, "request timed out"), 10.0)
    metrics.cycle_finished(report(RunOutcome.FATAL, counts=page.total))

    assert value("cdc_sync_rows_read_total", {"sync": "users"}) == 10
    synced = {"sync": "users", "outcome": "synced"}
    assert value("cdc_sync_pushes_total", synced) == 7
    assert value("cdc_sync_pushes_total", {"sync": "users", "outcome": "retrying"}) == 2
    assert backlog == 30
    assert value("cdc_sync_backlog_rows", {"sync": "users"}) == 0  # the cycle is over
    assert value("cdc_sync_api_errors_total", {"sync": "users", "code": "-1"}) == 1
    assert value("cdc_sync_api_errors_total", {"sync": "users", "code": "network"}) == 1
    assert value("cdc_sync_push_duration_seconds_count", {"sync": "users"}) == 3
    assert value("cdc_sync_cycles_total", {"sync": "users", "outcome": "fatal"}) == 1
    assert value("cdc_sync_cycle_duration_seconds_sum", {"sync": "users"}) == 2.0
    assert value("cdc_sync_healthy", {"sync": "users"}) == 0
    assert value("cdc_sync_interval_seconds", {"sync": "users"}) == 60


def test_last_success_is_a_clean_ok_cycle_and_starts_from_the_run_history(
    store: StateStore,
) -> None:
    """The last success survives a restart (read from the run history); a cycle that ends ok
    with users left retrying is no success."""
    run = store.start_run(NOW, None)
    store.finish_run(run, NOW + timedelta(seconds=1), RunOutcome.OK, CycleCounts(), None)
    clock = [2_000_000_000.0]
    metrics = Metrics("users", store, 60.0, now=lambda: clock[0], process=False)
    value = metrics.registry.get_sample_value
    labels = {"sync": "users"}
    restored = value("cdc_sync_last_success_timestamp_seconds", labels)

    clock[0] += 60
    metrics.cycle_finished(report(RunOutcome.OK, counts=CycleCounts(retrying=3)))
    after_retrying = value("cdc_sync_last_success_timestamp_seconds", labels)
    clock[0] += 60
    metrics.cycle_finished(report(RunOutcome.OK))

    assert restored == (NOW + timedelta(seconds=1)).timestamp()
    assert after_retrying == restored
    assert value("cdc_sync_last_success_timestamp_seconds", labels) == clock[0]
    assert value("cdc_sync_healthy", labels) == 1


def test_users_by_status_and_the_retry_queue_come_from_the_tracking_table(
    store: StateStore,
) -> None:
    """At scrape time the users by status and the due retries are counted in the database."""

    def upd(key: str, status: Status, due: datetime | None = None) -> Update:
        return Update(key, 1, status, None, "h", 1, None, "m", NOW, None, due)

    store.commit_page(
        [
            upd("a", Status.SYNCED),
            upd("b", Status.RETRYING, NOW - timedelta(minutes=1)),
            upd("c", Status.RETRYING, NOW + timedelta(hours=1)),
            upd("d", Status.FAILED),
        ],
        None,
        NOW,
    )
    metrics = Metrics("users", store, 60.0, now=NOW.timestamp, process=False)
    value = metrics.registry.get_sample_value

    assert value("cdc_sync_users", {"sync": "users", "status": "retrying"}) == 2
    assert value("cdc_sync_users", {"sync": "users", "status": "skipped"}) == 0
    assert value("cdc_sync_retry_queue_users", {"sync": "users"}) == 1


@pytest.mark.parametrize(
    ("fields", "lag"),
    [
        ({"caught_up": True}, 0.0),
        (
            {
                "source_clock": NOW,
                "watermark_after": Position(NOW - timedelta(minutes=5), 3),
            },
            300.0,
        ),
        ({"source_clock": None, "watermark_after": Position(7, 3)}, None),
        ({"source_clock": NOW, "watermark_after": None}, None),
    ],
    ids=["read to the end", "behind", "sequence cursor", "nothing read yet"],
)
def test_watermark_lag(fields: dict[str, Any], lag: float | None) -> None:
    """The source clock minus the watermark, 0 for a sync that read to the end."""
    assert watermark_lag(report(RunOutcome.OK, **fields)) == lag


# -- promtool and a real Prometheus -------------------------------------------------------------


def test_the_shipped_alert_rules_pass_promtool(promtool: str) -> None:
    """``prometheus/alerts.yml`` is valid: promtool parses every rule and expression."""
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


def metrics_config(
    tmp_path: Path, users: UserDb, api: EmulatorServer, port: int, **overrides: Any
) -> Path:
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        metrics={"listen": f"127.0.0.1:{port}"},
        **overrides,
    )
    migrated = cdc_sync(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return config


def test_a_running_daemon_serves_metrics_that_pass_promtool(
    users: UserDb, api: EmulatorServer, tmp_path: Path, promtool: str
) -> None:
    """``cdc-sync run`` with metrics.listen serves /metrics: what it synced, by sync name, in a
    form promtool's linter accepts."""
    users.add_users(range(1, 21))
    users.add_users([21], engagelab_euid=None)
    port = free_port()
    config = metrics_config(tmp_path, users, api, port)

    with daemon(config) as process:
        pushed = 'cdc_sync_pushes_total{outcome="synced",sync="users"}'
        users_now = 'cdc_sync_users{status="synced",sync="users"}'  # read at most every 5 s
        wait_until(
            lambda: all(sample(scrape_or_empty(port), s) == 20 for s in (pushed, users_now)),
            "20 users synced, and so counted",
            process,
        )
        text = scrape(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE) == 0, stderr_of(config)

    linted = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    read = sample(text, 'cdc_sync_rows_read_total{sync="users"}') or 0
    assert read >= 21 and read % 21 == 0  # each 1 s cycle re-reads the 5 min lookback window
    assert sample(text, 'cdc_sync_users{status="synced",sync="users"}') == 20
    assert sample(text, 'cdc_sync_users{status="skipped",sync="users"}') == 1
    assert sample(text, 'cdc_sync_healthy{sync="users"}') == 1
    assert sample(text, 'cdc_sync_push_duration_seconds_count{sync="users"}') == 20
    assert sample(text, 'cdc_sync_watermark_lag_seconds{sync="users"}') == 0
    assert "Traceback" not in stderr_of(config)


def scrape_or_empty(port: int) -> str:
    """A scrape, or nothing while the endpoint is not up yet (a readiness wait)."""
    try:
        return scrape(port)
    except OSError:
        return ""


@contextmanager
def prometheus_server(binary: str, tmp_path: Path, target: int, rules: Path) -> Iterator[int]:
    """A real Prometheus on a free loopback port, scraping ``target`` every second and
    evaluating ``rules`` every second, with its storage in ``tmp_path``; stopped afterwards."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "cdc-sync",
                        "static_configs": [{"targets": [f"127.0.0.1:{target}"]}],
                    }
                ],
            }
        )
    )
    with (tmp_path / "prometheus.log").open("w") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: api_get(port, "/-/ready") is not None, "Prometheus is ready")
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def api_get(port: int, path: str) -> Any:
    """A GET on Prometheus' HTTP API (its JSON), or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            body = answer.read().decode()
    except OSError:
        return None
    return json.loads(body) if path.startswith("/api/") else body


def firing(port: int) -> set[str]:
    found = api_get(port, "/api/v1/alerts")
    if not found:
        return set()
    return {a["labels"]["alertname"] for a in found["data"]["alerts"] if a["state"] == "firing"}


def test_prometheus_fires_the_stalled_alert_for_a_daemon_engagelab_refuses(
    users: UserDb, api: EmulatorServer, tmp_path: Path, prometheus: str
) -> None:
    """A real Prometheus scraping a daemon whose every cycle EngageLab refuses, its last clean
    cycle an hour ago, evaluates the shipped rules and fires CdcSyncStalled and CdcSyncRefused."""
    users.add_users(range(1, 6))
    port = free_port()
    # A minute between cycles: the daemon exits 3 after three refusals, long after the alerts.
    schedule = {"interval": "60s"}
    config = metrics_config(tmp_path, users, api, port, secret="wrong", schedule=schedule)
    history = StateStore(state_engine(f"sqlite:///{tmp_path}/state.db"), "users")
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    clean = history.start_run(an_hour_ago, None)
    history.finish_run(clean, an_hour_ago, RunOutcome.OK, CycleCounts(), None)
    history.engine.dispose()
    shipped = yaml.safe_load(RULES.read_text())
    for rule in shipped["groups"][0]["rules"]:
        rule.pop("for", None)  # the same expressions, without waiting minutes for them
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(shipped))

    with daemon(config) as process, prometheus_server(prometheus, tmp_path, port, rules) as web:
        deadline = time.monotonic() + DEADLINE
        while not {"CdcSyncStalled", "CdcSyncRefused"} <= firing(web):
            assert process.poll() is None, stderr_of(config)
            assert time.monotonic() < deadline, (firing(web), api_get(web, "/api/v1/rules"))
            time.sleep(POLL * 10)
        text = scrape(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE) == 0, stderr_of(config)

    assert sample(text, 'cdc_sync_healthy{sync="users"}') == 0
    assert (sample(text, 'cdc_sync_api_errors_total{code="40050",sync="users"}') or 0) >= 1
    assert api.emulator.contacts == {}
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
