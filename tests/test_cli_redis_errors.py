"""The CLI on a Redis that is down or refuses the password: one line, at once.

Each command runs as a real subprocess, as a user runs it, against a port
nothing listens on or a private password-protected ``redis-server``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_ordered.embedded import RedisServer
from celery_ordered.redis.clients import FIRST_CONTACT_RETRY_FOR, client_for
from tests.support import ROOT

#: The commands of issue 11, item 6, with the arguments each needs.
COMMANDS = [("ls",), ("inspect", "some-stream"), ("window", "some-stream", "3")]

#: A password with what URL parsers trip on: an unencoded "@" and ":".
PASSWORD = "s3cr@t:pw"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(
    *argv: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a command to its end; its result and how long it took."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.monotonic() - began


def assert_one_line_error(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert PASSWORD not in done.stdout + done.stderr
    return lines[0]


@pytest.fixture
def protected_redis() -> Iterator[int]:
    """A private redis-server on a TCP port that asks for PASSWORD."""
    port = free_port()
    with RedisServer(port=port, args=("--requirepass", PASSWORD)):
        yield port


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A TCP port where another server (RabbitMQ's greeting) answers, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"AMQP\x00\x00\x09\x01")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_port_that_is_not_a_redis_is_one_line_in_about_a_second(not_redis: int) -> None:
    # The broker's URL given for Redis's, say: the port answers, but not as Redis
    done, took = cli(
        "celery_ordered", "ordered", "--redis-url", f"redis://127.0.0.1:{not_redis}/0", "ls"
    )
    assert_one_line_error(done, "cannot reach Redis", f"127.0.0.1:{not_redis}", "--redis-url")
    assert took < FIRST_CONTACT_RETRY_FOR + 4, took


def test_a_stream_client_gives_up_on_a_port_that_is_not_a_redis_after_its_retry_time(
    not_redis: int,
) -> None:
    # Its retries once retried the connect inside each retried command, and
    # the health check inside that: tries multiplied, and it never gave up.
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client_for(f"redis://127.0.0.1:{not_redis}/0", 2.5).ping()
    assert 2.0 <= time.monotonic() - began < 2.5 + 4


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_redis_that_refuses_the_connection_is_one_line_in_about_a_second(
    command: tuple[str, ...],
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    done, took = cli("celery_ordered", "ordered", "--redis-url", url, *command)
    line = assert_one_line_error(done, "cannot reach Redis", "Connection refused", "--redis-url")
    assert "127.0.0.1" in line
    # Not 22 s of retries: about FIRST_CONTACT_RETRY_FOR, plus the interpreter's start.
    assert took < FIRST_CONTACT_RETRY_FOR + 4, took


def test_celery_ordered_with_the_apps_redis_down_names_the_flag() -> None:
    # Given the app's own setting (tests/apps/celeryapp.py reads it from the
    # environment) pointing at a Redis that is not there
    env = {"CO_TEST_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done, took = cli("celery", "-A", "tests.apps.celeryapp", "ordered", "inspect", "x", env=env)
    assert_one_line_error(done, "cannot reach Redis", "--redis-url")
    assert took < FIRST_CONTACT_RETRY_FOR + 6, took


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_wrong_password_is_one_line_naming_the_credentials(
    protected_redis: int, command: tuple[str, ...]
) -> None:
    url = f"redis://:wrong@127.0.0.1:{protected_redis}/0"
    done, took = cli("celery_ordered", "ordered", "--redis-url", url, *command)
    assert_one_line_error(done, "refused the credentials", "--redis-url")
    assert "wrong" not in done.stderr
    assert took < 10, took


def test_the_right_password_with_an_unencoded_at_sign_works(protected_redis: int) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected_redis}/0"
    done, _ = cli("celery_ordered", "ordered", "--redis-url", url, "ls")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no streams"


def test_a_database_the_redis_does_not_have_is_one_line_naming_the_flag() -> None:
    port = free_port()
    with RedisServer(port=port):
        done, _ = cli(
            "celery_ordered", "ordered", "--redis-url", f"redis://127.0.0.1:{port}/99", "ls"
        )
    assert_one_line_error(
        done, "has no such database", "DB index is out of range", "--redis-url", "database number"
    )


def test_a_tls_url_to_a_redis_without_tls_names_redis_url_as_the_fix() -> None:
    # Such a Redis never answers the TLS handshake: redis-py says only
    # "Timeout connecting to server", and "start it" was the wrong advice.
    port = free_port()
    with RedisServer(port=port):
        url = f"rediss://:{PASSWORD.replace('@', '%40')}@127.0.0.1:{port}/0?ssl_cert_reqs=none"
        done, _ = cli("celery_ordered", "ordered", "--redis-url", url, "ls")
    line = assert_one_line_error(
        done, "Timeout connecting", "if that port serves Redis without TLS, use redis://"
    )
    assert "start it" not in line
    assert "s3cr" not in line


def test_a_url_that_is_no_redis_url_is_one_line_naming_the_flag() -> None:
    done, _ = cli("celery_ordered", "ordered", "--redis-url", f"http://u:{PASSWORD}@h/", "ls")
    assert_one_line_error(done, "--redis-url", "is not a Redis URL")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6399/12?foo=bar", "option(s) foo after '?' are not taken"),
        # A cluster client would drop the misspelt option in silence: no timeout at all.
        (
            f"redis+cluster://:{PASSWORD}@127.0.0.1:6399?socket_timout=5",
            "option(s) socket_timout after '?' are not taken by a redis+cluster://",
        ),
        ("redis://127.0.0.1:6399/12x", "the database '12x' is not a number"),
        (f"redis://:{PASSWORD.replace('@', '/')}@127.0.0.1:6399/0", "percent-encode"),
    ],
    ids=["option", "cluster option", "database", "password"],
)
def test_a_url_redis_py_would_misread_is_one_line_naming_the_flag(url: str, expected: str) -> None:
    # Before: a traceback at the first connection, db 0 used in silence, or a
    # connection to a "port" cut out of the password (and the cut quoted)
    done, _ = cli("celery_ordered", "ordered", "--redis-url", url, "ls")
    line = assert_one_line_error(done, "--redis-url", expected)
    assert "s3cr" not in line


def test_a_sentinel_nobody_answers_for_is_one_short_line() -> None:
    url = f"sentinel://127.0.0.1:{free_port()}?master_name=mymaster"
    done, _ = cli("celery_ordered", "ordered", "--redis-url", url, "ls")
    # redis-py's error quotes each Sentinel client's repr: it is cut out
    line = assert_one_line_error(done, "No master found for 'mymaster'", "a Sentinel")
    assert "<redis." not in line
    assert len(line) < 400, line


def test_a_demo_window_over_the_limit_is_a_usage_error() -> None:
    done, _ = cli("celery_ordered", "demo", "--documents", "5", "--window", "2000000")
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    assert "--window must be at most 1,000,000, got 2000000" in done.stderr


def test_a_fail_fast_client_gives_up_on_a_redis_that_never_answered() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="refused"):
        client_for(url, 30.0, fail_fast=True).ping()
    assert time.monotonic() - began < FIRST_CONTACT_RETRY_FOR + 0.5


def test_a_fail_fast_client_retries_a_redis_that_answered_before() -> None:
    # Given a fail-fast client that has talked to its Redis
    port = free_port()
    server = RedisServer(port=port).start()
    try:
        client = client_for(f"redis://127.0.0.1:{port}/0", 3.0, fail_fast=True)
        assert client.ping()
    finally:
        server.stop()
    # When that Redis goes away, the client retries for its whole retry_for
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - began >= 2.5


def test_the_library_streams_keep_their_retry_time_by_default() -> None:
    # A stream's own client (fail_fast=False) still rides out a Redis that is
    # not there yet for ordered_redis_retry_for: workers must not drop outcomes.
    url = f"redis://127.0.0.1:{free_port()}/0"
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client_for(url, 2.5, transport_options={}).ping()
    assert time.monotonic() - began >= 2.0
