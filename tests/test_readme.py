"""Every python snippet of the README runs as written, and prints what it says.

Each ```` ```python ```` block of README.md is preceded by a comment saying
how it is tested:

- ``<!-- readme: file NAME -->``: the block is a file of that name (the
  quickstart's ``tasks.py``), written into a fresh folder;
- ``<!-- readme: run NAME -->``: the block is a program, run in that folder
  (with a ``celery -A tasks worker`` started there, as the README says, when
  a ``tasks.py`` was written before it);
- ``<!-- readme: tested by tests/test_x.py::test_name -->``: code that needs
  more than a script (a web app), run by that test.

Only the Redis URL ``redis://localhost:6379/0`` is replaced, by the tests'
Redis (and broker), so the run uses what the suite uses.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from markdown_it import MarkdownIt

from celery_ordered.redis.urls import socket_url
from tests.support import ROOT
from tests.support.tools import require_tool

README = ROOT / "README.md"
DIRECTIVE = re.compile(r"^<!-- readme: (?P<kind>file|run|tested by) (?P<arg>\S+) -->$")
README_REDIS = "redis://localhost:6379/0"


@dataclass(frozen=True)
class Snippet:
    kind: str
    arg: str
    code: str
    line: int


def snippets() -> list[Snippet]:
    """The README's python blocks, each with the directive above it."""
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.info.strip() != "python" or token.map is None:
            continue
        start = token.map[0]
        match = DIRECTIVE.match(lines[start - 1].strip()) if start else None
        assert match, (
            f"README.md:{start + 1}: a python block needs a '<!-- readme: run NAME -->', "
            "'<!-- readme: file NAME -->' or '<!-- readme: tested by PATH::TEST -->' line "
            "above it"
        )
        found.append(Snippet(match["kind"], match["arg"], token.content, start + 1))
    return found


def by_name(kind: str, arg: str) -> Snippet:
    (snippet,) = [s for s in snippets() if s.kind == kind and s.arg == arg]
    return snippet


def test_every_python_block_of_the_readme_says_how_it_is_tested() -> None:
    found = snippets()
    assert {s.arg for s in found if s.kind == "run"} == {"hero", "quickstart", "parallel-queue"}
    for snippet in found:
        if snippet.kind == "tested by":
            path, _, test = snippet.arg.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {re.escape(test)}\(", source, re.M), snippet


@pytest.fixture
def folder(tmp_path: Path, redis_url: str) -> tuple[Path, dict[str, str]]:
    """A fresh folder for the snippets, and the environment to run them in."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), str(ROOT)])),
        "PYTHONUNBUFFERED": "1",
        "C_FORCE_ROOT": "1",
    }
    return tmp_path, env


def run(code: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    script = cwd / f"snippet-{uuid.uuid4().hex[:6]}.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, script.name], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def test_the_first_example_prints_every_page_in_order(
    folder: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = folder
    out = run(by_name("run", "hero").code, cwd, env)
    assert out.splitlines() == [f"<h1>page {page}</h1>" for page in range(100)]


def write_tasks_py(cwd: Path, redis_url: str) -> None:
    """tasks.py as the README writes it, on the tests' Redis and broker."""
    tasks = by_name("file", "tasks.py").code
    assert tasks.count(README_REDIS) == 2
    tasks = tasks.replace(
        f'broker="{README_REDIS}"', f'broker="{os.environ["CO_TEST_BROKER_URL"]}"'
    ).replace(README_REDIS, redis_url)
    (cwd / "tasks.py").write_text(tasks, encoding="utf-8")


@contextlib.contextmanager
def worker_of_tasks_py(command: list[str], cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """``command`` (a ``celery -A tasks worker``) running in ``cwd`` meanwhile."""
    log = (cwd / "worker.log").open("wb")
    worker = subprocess.Popen(
        [*command, "-A", "tasks", "worker", "--concurrency=2", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
        # Celery's default queue, which the README's app uses, goes with it
        redis.Redis.from_url(socket_url(os.environ["CO_TEST_BROKER_URL"])).delete(
            "celery", "_kombu.binding.celery"
        )


def test_the_quickstart_runs_as_written_with_a_worker_started_as_written(
    folder: tuple[Path, dict[str, str]], redis_url: str
) -> None:
    cwd, env = folder
    # Given tasks.py as the README writes it, and `celery -A tasks worker`, as
    # the README says, in the folder of tasks.py
    write_tasks_py(cwd, redis_url)
    with worker_of_tasks_py([sys.executable, "-m", "celery"], cwd, env):
        # When main.py runs as written
        out = run(by_name("run", "quickstart").code, cwd, env)
    # Then every row's result and each checkpoint come out in submission order
    lines = out.splitlines()
    expected = []
    for row_id in range(3000):
        expected.append(str({"row": row_id, "square": row_id * row_id}))
        if row_id % 1000 == 999:
            expected.append(str(["checkpoint", row_id]))
    assert lines == expected


def test_a_plain_function_beside_tasks_py_runs_on_the_worker_as_celery_finds_tasks(
    folder: tuple[Path, dict[str, str]], redis_url: str
) -> None:
    cwd, env = folder
    # Given tasks.py as written, a plain function in a module beside it, and
    # the `celery` command run in that folder, which is not on sys.path: only
    # Celery's own imports look there
    celery = require_tool(
        "celery",
        "the console script installed next to Python",
        find=lambda name: shutil.which(name, path=os.path.dirname(sys.executable)),
    )
    write_tasks_py(cwd, redis_url)
    (cwd / "geometry.py").write_text("def area(w, h):\n    return w * h\n", encoding="utf-8")
    env = {**env, "PYTHONPATH": str(ROOT)}
    producer = """
from celery_ordered import OrderedResultStream
from geometry import area
from tasks import app

stream = OrderedResultStream(app, window=4)
for w in range(3):
    stream.put(area, w, 2)
stream.close()
print(list(stream))
stream.delete()
"""
    with worker_of_tasks_py([celery], cwd, env):
        # When the producer puts that function
        out = run(producer, cwd, env)
    # Then the worker found it as it finds tasks: every result, in order
    assert out.splitlines() == ["[0, 2, 4]"]


def test_the_quickstart_pattern_survives_a_mistake_in_the_producer(
    folder: tuple[Path, dict[str, str]], redis_url: str
) -> None:
    # Given the README's main.py with the mistake a newcomer makes first: a
    # name the producer thread does not define (issue: the consumer used to
    # end quietly with exit code 0)
    cwd, env = folder
    main = by_name("run", "quickstart").code
    assert "for row_id in range(3000):" in main
    main = main.replace("for row_id in range(3000):", "for row_id in row_ids:")
    # with tasks.py as written, on the tests' Redis (the producer fails before
    # it sends anything, so no worker is needed)
    tasks = by_name("file", "tasks.py").code.replace(
        f'broker="{README_REDIS}"', f'broker="{os.environ["CO_TEST_BROKER_URL"]}"'
    )
    (cwd / "tasks.py").write_text(tasks.replace(README_REDIS, redis_url), encoding="utf-8")
    script = cwd / "main.py"
    script.write_text(main, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, script.name], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    # Then the consumer does not end as if the job were done: it fails, naming
    # the producer's error
    assert done.returncode != 0, done.stdout
    assert "ProducerFailed" in done.stderr, done.stderr
    assert "NameError" in done.stderr, done.stderr
    assert "row_ids" in done.stderr, done.stderr


def test_the_parallel_queue_example_prints_results_then_the_marker(
    folder: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = folder
    out = run(by_name("run", "parallel-queue").code, cwd, env)
    assert out.splitlines() == ["[2, 3, 1]", "BatchDone"]
