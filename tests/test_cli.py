"""`celery -A proj ordered ...` and `celery-ordered ordered ...`, against real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from celery_ordered import commands
from celery_ordered.cli import main as standalone
from celery_ordered.redis.keys import StreamKeys
from tests.apps.tasks import echo
from tests.support import ROOT
from tests.support.cli import run_ordered
from tests.support.processes import as_from_a_terminal


@pytest.fixture
def blocked_stream(worker: Any, make_stream: Any, redis_client: redis.Redis) -> Any:
    """A stream whose number 1 went to a queue nobody serves: it blocks 2 and 3."""
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    stream = make_stream(window=9)
    stream.put(echo, "zero")
    stream.put(echo.s("one").set(queue=queue))
    stream.put("two")
    stream.put("three")
    assert stream.get(timeout=30) == "zero"
    stream.ack()  # what other processes see as delivered is what was acknowledged
    yield stream
    redis_client.delete(queue)


def test_inspect_names_the_head_of_line_blocker(blocked_stream: Any) -> None:
    result = run_ordered("inspect", blocked_stream.name)
    assert result.exit_code == 0, result.output
    assert "claimed       4" in result.output
    assert "delivered     1" in result.output
    assert "buffered      2" in result.output
    assert "window        9" in result.output
    assert "blocker       number 1, waiting" in result.output


def test_ls_lists_streams_with_their_progress(blocked_stream: Any) -> None:
    result = run_ordered("ls")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if blocked_stream.name in line)
    assert "1/4 delivered" in line
    assert "window 9" in line


def test_ls_leaves_out_a_stream_that_ends_while_it_lists(
    blocked_stream: Any, make_stream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stream that is deleted (or expires) after ls found its name,
    # before ls reads its counters: what finished jobs do all the time
    gone = make_stream(window=5)
    gone.put("a marker")
    scan = commands._Target.names

    def names_then_delete(target: Any) -> list[str]:
        found = scan(target)
        assert gone.name in found
        gone.delete()
        return found

    monkeypatch.setattr(commands._Target, "names", names_then_delete)
    # Then ls lists the others and leaves it out, instead of failing on it
    result = run_ordered("ls")
    assert result.exit_code == 0, result.output
    assert gone.name not in result.output
    assert any(blocked_stream.name in line for line in result.output.splitlines())


def test_window_changes_the_cap_live_and_refuses_nonsense(blocked_stream: Any) -> None:
    assert run_ordered("window", blocked_stream.name, "3").exit_code == 0
    assert blocked_stream.window == 3
    refused = run_ordered("window", blocked_stream.name, "0")
    assert refused.exit_code == 2
    assert "window must be an int >= 1, got 0" in refused.output
    assert blocked_stream.window == 3


def test_watch_shows_progress_and_ends_with_the_stream(worker: Any, make_stream: Any) -> None:
    stream = make_stream()
    for i in range(5):
        stream.put(echo, i)
    stream.close()
    assert list(stream) == list(range(5))
    result = run_ordered("watch", stream.name, "--interval", "0.01")
    assert result.exit_code == 0, result.output
    assert "[##############################] 5/5 delivered" in result.output


def test_watch_with_a_count_stops_on_an_open_stream(blocked_stream: Any) -> None:
    result = run_ordered("watch", blocked_stream.name, "--count", "2", "--interval", "0.01")
    assert result.exit_code == 0, result.output
    assert result.output.count("1/4 delivered") == 2


def test_purge_asks_then_deletes_every_key(blocked_stream: Any, redis_client: Any) -> None:
    keys = StreamKeys(blocked_stream.name).all()
    kept = run_ordered("purge", blocked_stream.name, input="n\n")
    assert kept.exit_code == 1
    assert redis_client.exists(*keys) > 0
    gone = run_ordered("purge", blocked_stream.name, "--yes")
    assert gone.exit_code == 0, gone.output
    assert list(redis_client.scan_iter(f"co:{{{blocked_stream.name}}}:*")) == []


def test_an_unknown_stream_is_a_clear_error(redis_url: str) -> None:
    result = run_ordered("inspect", f"no-such-{uuid.uuid4().hex}")
    assert result.exit_code == 1
    assert "no stream named" in result.output


@pytest.mark.parametrize(
    "command", [["inspect"], ["watch", "--count", "1"], ["window"], ["purge", "--yes"]]
)
@pytest.mark.parametrize("name", ["bad name!", ""])
def test_a_bad_stream_name_is_a_usage_error_not_a_traceback(command: list[str], name: str) -> None:
    args = [command[0], name, *command[1:]] + (["4"] if command[0] == "window" else [])
    result = run_ordered(*args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for 'NAME': stream name" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_standalone_command_takes_a_redis_url(blocked_stream: Any, redis_url: str) -> None:
    result = CliRunner().invoke(
        standalone, ["ordered", "--redis-url", redis_url, "inspect", blocked_stream.name]
    )
    assert result.exit_code == 0, result.output
    assert "blocker       number 1" in result.output


def test_watch_shows_no_shrinking_share_and_ctrl_c_ends_it_quietly(
    blocked_stream: Any,
) -> None:
    # Given `ordered watch` following an open stream, as a real process
    watcher = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.apps.celeryapp", "ordered", "watch",
         blocked_stream.name, "--lines", "--interval", "0.02"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline()]
        assert "1/4 delivered" in lines[0], lines
        # When producers claim more while it watches (the total so far grows)
        for i in range(4):
            blocked_stream.put(f"more {i}")
        while "1/8 delivered" not in lines[-1]:
            line = watcher.stdout.readline()
            assert line, (lines, watcher.stderr.read() if watcher.stderr else "")
            lines.append(line)
        # Then no refresh of the open stream showed a bar or a share that could shrink
        assert not any("#" in line or "%" in line for line in lines), lines
        # And Ctrl-C ends it like watch(1): exit code 0, nothing said
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        assert "Aborted" not in err
        assert err.strip() == ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()


def test_watch_draws_its_bar_only_once_the_total_is_final(blocked_stream: Any) -> None:
    open_ = run_ordered("watch", blocked_stream.name, "--count", "1", "--bar")
    assert open_.exit_code == 0, open_.output
    assert "#" not in open_.output
    assert "/4 delivered 0/s" not in open_.output
    assert "1/4 delivered, 1 in flight" in open_.output  # delivered/claimed so far
    blocked_stream.close()
    closed = run_ordered("watch", blocked_stream.name, "--count", "1", "--lines")
    assert closed.exit_code == 0, closed.output
    assert closed.output.startswith("[#######.......................] 1/4 delivered")
