"""The examples run as their READMEs say, against real Redis and workers.

Each test runs the documented commands as they are written (examples/README.md
and the examples' docstrings), as subprocesses from the directory the docs
name; only the environment points them at the tests' Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_ordered.redis.urls import socket_url
from tests.apps.tasks import echo
from tests.support import ROOT
from tests.support.processes import as_from_a_terminal
from tests.support.waiting import wait_until

#: Seconds a documented command may take.
COMMAND_TIMEOUT = 180


def documented(path: Path, command_start: str) -> list[str]:
    """The argv of the first command in ``path`` starting with ``command_start``."""
    for line in path.read_text().splitlines():
        text = line.strip().lstrip("$").strip()
        for piece in re.findall(r"`([^`]+)`", text) or [text]:
            if piece.startswith(command_start):
                return shlex.split(piece.split("#")[0])
    raise AssertionError(f"{path.relative_to(ROOT)} documents no {command_start!r} command")


def python(argv: list[str]) -> list[str]:
    """``argv`` run by this interpreter (``python ...``, ``celery ...``, ``uvicorn ...``)."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] in ("celery", "uvicorn"):
        return [sys.executable, "-m", *argv]
    raise AssertionError(f"not a python, celery or uvicorn command: {argv}")


@pytest.fixture
def example_env(redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The tests' Redis as the examples' Redis and broker, on a queue of the test's own.

    The queue's keys in the broker are deleted after the test.
    """
    queue = f"example-{uuid.uuid4().hex[:8]}"
    yield {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "QUEUE": queue,
        "C_FORCE_ROOT": "1",
        "TMPDIR": str(tmp_path),
    }
    broker = redis.Redis.from_url(socket_url(os.environ["CO_TEST_BROKER_URL"]))
    try:
        broker.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    finally:
        broker.close()


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], log: Path) -> Iterator[None]:
    """Run ``argv`` (a documented worker or server) until the block ends; then stop it as
    Ctrl-C would."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            python(argv), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=as_from_a_terminal,
        )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv[0]} did not stop on Ctrl-C:\n{log.read_text()}") from None


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> str:
    done = subprocess.run(
        python(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_quickstart_as_documented_prints_pages_and_markers_in_order(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    # Given the worker the examples' README starts
    readme = ROOT / "examples" / "README.md"
    worker = documented(readme, "celery -A examples.quickstart worker")
    assert worker == ["celery", "-A", "examples.quickstart", "worker"]
    with background(worker, example_env, tmp_path / "worker.log"):
        # When the quickstart runs as documented: as a module, its own __main__
        command = documented(readme, "python -m examples.quickstart")
        out = run(command, example_env)
    # Then every page and marker comes out, in order
    lines = out.splitlines()
    pages = [int(m.group(1)) for line in lines if (m := re.match(r"page\s+(\d+) rendered", line))]
    assert pages == list(range(40))
    markers = [line for line in lines if line.startswith("---")]
    assert markers == [f"--- pages {a}-{a + 9} done ---" for a in (0, 10, 20, 30)]
    assert lines.index(markers[0]) == 10  # after pages 0-9, before page 10


def test_batch_indexing_as_documented_logs_every_batch_in_order() -> None:
    command = documented(ROOT / "examples" / "README.md", "python examples/batch_indexing.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "CO_TEST_"))}
    out = run(command, env)
    batches = re.findall(r"batch (\d+) done: 50 documents \((\d+) indexed so far\)", out)
    assert [int(b) for b, _ in batches] == list(range(10))
    assert [int(n) for _, n in batches] == [50 * (b + 1) for b in range(10)]


def test_the_django_command_as_documented_runs_a_job_locally() -> None:
    project = ROOT / "examples" / "django_project"
    command = documented(project / "README.md", "python manage.py run_ordered_job --local")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "CO_TEST_"))}
    out = run(command, env, cwd=project)
    assert "40 items, 3 failed, every outcome in order" in out
    assert [int(n) for n in re.findall(r"batch (\d+)", out)][:4] == [0, 1, 2, 3]


def test_the_fastapi_example_under_uvicorn_without_redis_url_says_how_to_run_it(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    # Given uvicorn started on the example without REDIS_URL (the zero-setup
    # default is `python -m examples.fastapi_app.app`)
    env = {k: v for k, v in example_env.items() if k not in ("REDIS_URL", "BROKER_URL")}
    done = subprocess.run(
        ["uvicorn", "examples.fastapi_app.app:app"],
        cwd=ROOT, env={**env, "UVICORN_PORT": "0"}, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    # Then it does not serve a page whose every job fails: it stops, and says why
    assert done.returncode != 0
    assert "No REDIS_URL: run `python -m examples.fastapi_app.app`" in done.stderr, done.stderr


def test_the_fastapi_example_as_documented_streams_a_job_in_order(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    # Given the worker and the server the example's README starts, in the same
    # environment (uvicorn takes a free port from UVICORN_PORT=0)
    readme = ROOT / "examples" / "fastapi_app" / "README.md"
    worker = documented(readme, "celery -A examples.fastapi_app.app:celery_app worker")
    server = documented(readme, "uvicorn examples.fastapi_app.app:app")
    assert server == ["uvicorn", "examples.fastapi_app.app:app"]
    log, worker_log = tmp_path / "uvicorn.log", tmp_path / "worker.log"
    with (
        background(worker, example_env, worker_log),
        background(server, {**example_env, "UVICORN_PORT": "0"}, log),
    ):
        found = wait_until(
            lambda: re.search(r"Uvicorn running on (http://[\d.]+:\d+)", log.read_text()),
            "uvicorn listening",
        )
        site = found.group(1)
        # (A task sent before the worker has bound its queue in the broker is lost.)
        wait_until(lambda: " ready." in worker_log.read_text(), "the worker ready")
        # When a job of 20 items in batches of 5 is started, and read as NDJSON
        start = urllib.request.Request(f"{site}/jobs", data=b"items=20&batch=5")
        with urllib.request.urlopen(start, timeout=COMMAND_TIMEOUT) as answer:
            assert answer.status == 201
            job = json.load(answer)
        with urllib.request.urlopen(site + job["results"], timeout=COMMAND_TIMEOUT) as body:
            lines = [json.loads(line) for line in body.read().splitlines()]
    # Then every outcome comes, in order: item 13 failed at its place, a marker
    # after each batch, and the end
    assert [line.get("position") for line in lines] == [*range(24), None]
    values = [line.get("value") or line.get("error") for line in lines[:-1]]
    assert [v["item"] for v in values if "item" in v] == [i for i in range(20) if i != 13]
    assert values[15] == {"type": "ValueError", "message": "item 13 is unlucky"}
    assert [v["marker"] for v in values if "marker" in v] == [f"batch {b} done" for b in range(4)]
    assert lines[-1] == {"end": True, "total": 24}


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
    run_ = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "examples.quickstart", "ordered", "inspect",
         stream.name],
        cwd=ROOT, env=example_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Then it shows the stream's counters and names the head-of-line blocker
    assert run_.returncode == 0, run_.stderr
    fields = dict(re.findall(r"^(\w[\w ]*?)\s{2,}(.+)$", run_.stdout, re.MULTILINE))
    assert fields["claimed"] == "3"
    assert fields["delivered"] == "1"
    assert fields["in flight"] == "1"
    assert fields["buffered"] == "1"
    assert fields["blocker"].startswith("number 1, waiting ")
