"""The ordering state lives in Redis whatever Celery's broker is: RabbitMQ here."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_ordered import OrderedResultStream
from tests.conftest import ROOT
from tests.tasks import CustomError, fail, sleep_echo

AMQP_URL = os.environ.get("CO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rabbit_app(redis_url: str) -> Any:
    if "CO_TEST_AMQP_URL" not in os.environ and not _rabbitmq_answers():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (set CO_TEST_AMQP_URL)")
    queue = f"co-amqp-{uuid.uuid4().hex[:8]}"
    app = Celery("rabbit", set_as_current=False)
    app.conf.update(
        broker_url=AMQP_URL,
        ordered_redis_url=redis_url,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.celeryapp", "worker", "-Q", queue,
         "--concurrency=3", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--loglevel=ERROR"],
        cwd=ROOT, env={**os.environ, "CO_TEST_BROKER_URL": AMQP_URL, "C_FORCE_ROOT": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield app
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def test_order_markers_and_errors_with_rabbitmq_as_the_broker(rabbit_app: Any) -> None:
    stream = OrderedResultStream(rabbit_app, window=16)
    rng = random.Random(11)

    def produce() -> None:
        with stream:
            for i in range(120):
                stream.put(sleep_echo, i, rng.uniform(0, 0.01))
                if i % 40 == 39:
                    stream.put({"batch": i // 40})
            stream.put(fail, "at the end")

    threading.Thread(target=produce, daemon=True).start()
    try:
        seen: list[Any] = []
        while True:
            try:
                seen.append(next(stream))
            except StopIteration:
                break
            except CustomError as exc:
                seen.append(exc)
        expected: list[Any] = []
        for i in range(120):
            expected.append(i)
            if i % 40 == 39:
                expected.append({"batch": i // 40})
        assert seen[:-1] == expected
        assert isinstance(seen[-1], CustomError)
        assert "at the end" in str(seen[-1])
    finally:
        stream.delete()
