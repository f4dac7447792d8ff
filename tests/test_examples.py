"""The examples run as their READMEs say, against real Redis and workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.tasks import echo


@pytest.fixture
def example_env(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "C_FORCE_ROOT": "1",
    }


def test_quickstart_prints_pages_and_markers_in_order(example_env: dict[str, str]) -> None:
    # Given the worker the quickstart's docstring tells to start, on a queue of its own
    queue = f"quickstart-{uuid.uuid4().hex[:8]}"
    env = example_env
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "examples.quickstart", "worker",
         "-Q", queue, "--concurrency=3", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # When the quickstart runs (its tasks routed to that queue)
        code = (
            "import examples.quickstart as q;"
            f"q.app.conf.task_default_queue = {queue!r};"
            "q.main(30, 10)"
        )
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    # Then every page and marker comes out, in order
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    pages = [int(m.group(1)) for line in lines if (m := re.match(r"page\s+(\d+) rendered", line))]
    assert pages == list(range(30))
    markers = [line for line in lines if line.startswith("---")]
    assert markers == [f"--- pages {a}-{a + 9} done ---" for a in (0, 10, 20)]
    assert lines.index(markers[0]) == 10  # after pages 0-9, before page 10


def test_batch_indexing_logs_every_batch_in_order() -> None:
    run = subprocess.run(
        [sys.executable, "examples/batch_indexing.py", "4", "15"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    batches = re.findall(r"batch (\d+) done: 15 documents \((\d+) indexed so far\)", run.stdout)
    assert [int(b) for b, _ in batches] == [0, 1, 2, 3]
    assert [int(n) for _, n in batches] == [15, 30, 45, 60]


def test_celery_ordered_inspect_on_the_quickstarts_running_stream(
    example_env: dict[str, str], worker: object, make_stream: Any
) -> None:
    # Given a running stream in the quickstart's Redis whose number 1 went to
    # a queue nobody serves: it holds back number 2, which has arrived
    stream = make_stream(window=8)
    stream.put(echo, "zero")
    stream.put(echo.s("one").set(queue=f"nobody-{uuid.uuid4().hex[:6]}"))
    stream.put("two")
    assert stream.get(timeout=30) == "zero"
    stream.ack()
    # When Celery's own command looks at it through the quickstart's app
    run = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "examples.quickstart", "ordered", "inspect",
         stream.name],
        cwd=ROOT, env=example_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Then it shows the stream's counters and names the head-of-line blocker
    assert run.returncode == 0, run.stderr
    fields = dict(re.findall(r"^(\w[\w ]*?)\s{2,}(.+)$", run.stdout, re.MULTILINE))
    assert fields["claimed"] == "3"
    assert fields["delivered"] == "1"
    assert fields["in flight"] == "1"
    assert fields["buffered"] == "1"
    assert fields["blocker"].startswith("number 1, waiting ")
