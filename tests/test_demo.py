"""``celery-ordered demo``: the README's batch-indexing story, run end to end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from celery_ordered import RedisServer, __version__
from celery_ordered.cli import main
from tests.support.processes import cmdline, descendants
from tests.support.tools import require_tool
from tests.support.workers import Worker

pytestmark = pytest.mark.usefixtures("no_leftovers")

BATCH_LINE = re.compile(r"^batch +(\d+) done: (\d+) documents$", re.MULTILINE)
ORDER_OK = "order             every result in submission order: ok"


def clean_env() -> dict[str, str]:
    """The environment without any Celery or test settings: a fresh machine's."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CELERY_", "CO_TEST_"))
    }


def run_demo(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command,
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def batches(output: str) -> list[tuple[int, int]]:
    return [(int(b), int(d)) for b, d in BATCH_LINE.findall(output)]


def test_the_demo_logs_every_batch_in_order(tmp_path):
    out = run_demo(
        [
            sys.executable, "-m", "celery_ordered", "demo",
            "--documents", "300", "--batch-size", "50", "--workers", "2",
        ],
        cwd=tmp_path,
    )  # fmt: skip

    assert out.startswith("Starting a private Redis and local Celery workers...")
    assert "2 worker processes" in out
    assert batches(out) == [(k, 50) for k in range(6)]
    assert "300/300 documents" in out  # the progress bar reached the end
    summary = out[out.index("Summary") :]
    assert "documents         300 in 6 batches" in summary
    assert "window            20" in summary  # 10 x workers
    assert ORDER_OK in summary
    assert list(tmp_path.iterdir()) == []  # it wrote nothing where it ran


def test_the_console_script_with_an_uneven_last_batch(tmp_path):
    script = require_tool(
        "celery-ordered",
        "the console script installed next to Python",
        find=lambda name: shutil.which(name, path=os.path.dirname(sys.executable)),
    )

    out = run_demo(
        [script, "demo", "--documents", "7", "--batch-size", "3", "--workers", "1"],
        cwd=tmp_path,
    )

    assert batches(out) == [(0, 3), (1, 3), (2, 1)]
    assert "documents         7 in 3 batches" in out
    assert ORDER_OK in out


def test_quiet_batches_prints_only_progress_and_summary():
    result = CliRunner().invoke(
        main,
        ["demo", "--documents", "40", "--batch-size", "10", "--workers", "1", "--quiet-batches"],
    )

    assert result.exit_code == 0, result.output
    assert batches(result.output) == []
    assert "documents         40 in 4 batches" in result.output
    assert ORDER_OK in result.output


@contextlib.contextmanager
def demo_in_a_terminal(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """The demo started as from a terminal of its own (its own process group),
    and its output up to its first batch: mid-run, a batch is done, most are not.

    The caller ends it; whatever is left of its group is killed on the way out.
    """
    demo = subprocess.Popen(
        [sys.executable, "-m", "celery_ordered", "demo", "--workers", "2"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As a terminal starts it: with Ctrl-C's default action, even where this
        # run inherited SIGINT ignored (a script's background job, as CI's).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if BATCH_LINE.search(line):
                break
        yield demo, lines
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate()


def assert_gone_without_a_trace(demo: subprocess.Popen[str], output: str, tmp_path: Path) -> None:
    assert "Traceback" not in output, output
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.pid, 0)  # no process of the group is left
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_demo_at_once_and_leaves_nothing_behind(tmp_path):
    # Given the demo running in a terminal, mid-run
    with demo_in_a_terminal(tmp_path) as (demo, _):
        # When the user presses Ctrl-C (the terminal signals the whole group)
        os.killpg(demo.pid, signal.SIGINT)
        # Then it ends at once (its producer no longer waits for room in the
        # window), and so do its workers and its private Redis
        output, _ = demo.communicate(timeout=30)
    assert demo.returncode != 0
    assert "Aborted!" in output, output  # click's word for a KeyboardInterrupt
    assert_gone_without_a_trace(demo, output, tmp_path)


@pytest.mark.slow  # the demo retries its Redis for ordered_redis_retry_for (20 s)
def test_the_demo_reports_its_private_redis_dying_in_one_line(tmp_path):
    # Given the demo running on its private Redis, mid-run
    with demo_in_a_terminal(tmp_path) as (demo, lines):
        # When that Redis dies
        servers = [
            pid
            for pid in descendants(demo.pid)
            if os.path.basename(cmdline(pid).split(" ")[0]) == "redis-server"
        ]
        assert len(servers) == 1, "".join(lines)
        os.kill(servers[0], signal.SIGKILL)
        output, _ = demo.communicate(timeout=120)
    # Then the demo says so in one line, and leaves nothing behind
    assert demo.returncode == 1
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    assert "did not answer" in errors[0], output
    assert_gone_without_a_trace(demo, output, tmp_path)


def test_a_fleet_worker_started_without_its_environment_says_what_it_lacks(tmp_path):
    # Given `celery -A celery_ordered.demo worker` started without the README's Redis variable
    env = {**clean_env(), "C_FORCE_ROOT": "1"}
    worker = subprocess.Popen(
        # (-b memory://: wherever the default broker is, this worker touches nothing)
        [sys.executable, "-m", "celery", "-A", "celery_ordered.demo", "-b", "memory://",
         "worker", "-c", "1",
         "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        said = ""
        for line in worker.stdout:  # until it says it, or ends
            if "celery-ordered demo worker:" in line:
                said = line
                break
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.communicate()
    # Then it names what is missing (celery's -b sets CELERY_BROKER_URL), and how to set it
    assert "demo worker: CELERY_ORDERED_REDIS_URL not set" in said
    assert "celery -A celery_ordered.demo worker" in said


@pytest.mark.parametrize(
    "args",
    [
        ["--broker-url", "redis://127.0.0.1:1/0"],
        ["--redis-url", "redis://127.0.0.1:1/0"],
    ],
    ids=["broker-only", "redis-only"],
)
def test_a_fleet_run_needs_both_urls(args):
    result = CliRunner().invoke(main, ["demo", *args])

    assert result.exit_code == 2
    assert "needs both --broker-url and --redis-url" in result.output
    assert "Running on the fleet" not in result.output
    assert "Starting a private Redis" not in result.output


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        ("--redis-url", "redis://:***@127.0.0.1:1/0"),
        ("--broker-url", "amqp://guest:***@127.0.0.1:1//"),
    ],
)
def test_a_fleet_it_cannot_reach_is_one_line_without_the_password(flag, shown, redis_url):
    urls = {"--redis-url": redis_url, "--broker-url": redis_url}
    urls[flag] = shown.replace("***", "s3cret")
    result = CliRunner().invoke(main, ["demo", *[x for item in urls.items() for x in item]])

    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {flag} {shown!r}: "), result.output
    assert "fix the URL" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "s3cret" not in result.output
    assert "Running on the fleet" not in result.output


@pytest.mark.parametrize("option", ["--documents", "--batch-size", "--workers", "--window"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sizes_below_one_are_refused(option, value):
    result = CliRunner().invoke(main, ["demo", option, value])

    assert result.exit_code == 2
    assert f"{option} must be at least 1, got {value}" in result.output
    assert "Starting a private Redis" not in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])

    assert result.exit_code == 0
    assert result.output.strip() == f"celery-ordered, version {__version__}"


def test_the_demo_runs_on_a_fleet(tmp_path):
    # The fleet: a Celery worker of the demo app, on a Redis of the test's own.
    with RedisServer() as server:
        env = {
            **clean_env(),
            "CELERY_BROKER_URL": server.broker_url,
            "CELERY_ORDERED_REDIS_URL": server.url,
        }
        with Worker("celery_ordered.demo", cwd=tmp_path, env=env):
            out = run_demo(
                [
                    sys.executable, "-m", "celery_ordered", "demo",
                    "--documents", "60", "--batch-size", "20", "--window", "8",
                    "--broker-url", server.broker_url, "--redis-url", server.url,
                ],
                cwd=tmp_path,
            )  # fmt: skip

    assert out.startswith(f"Running on the fleet behind {server.broker_url}")
    assert "Starting a private Redis" not in out
    assert batches(out) == [(0, 20), (1, 20), (2, 20)]
    assert "window            8" in out
    assert ORDER_OK in out
