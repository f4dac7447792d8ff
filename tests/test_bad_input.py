"""Bad input is refused before a number is claimed, and leaves no gap behind."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from celery.exceptions import ImproperlyConfigured

from celery_ordered import (
    ConfigurationError,
    OrderedResultStream,
    StreamClosedError,
    UnsendableError,
)
from tests.apps.tasks import Holder, echo, plain_add, plain_celery_add

pytestmark = pytest.mark.usefixtures("worker")


def _outer() -> Any:
    def nested(x: int) -> int:
        return x

    return nested


class _Local:
    def method(self, x: int) -> int:
        return x


def _assert_no_gap(stream: OrderedResultStream, good_before: int) -> None:
    """The stream still works, and only the good puts took numbers."""
    assert stream.put(echo, "after") == good_before
    stream.close()
    assert list(stream) == ["before"] * good_before + ["after"]
    assert stream.stats().claimed == good_before + 1


def P(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of one put()."""
    return args, kwargs


# Each case: (id, a function making put()'s arguments, error class, words the
# message must contain: what is wrong and how to fix it).
BAD_PUTS: list[tuple[str, Any, type[BaseException], list[str]]] = [
    ("lambda", lambda: P(lambda x: x, 1), UnsendableError, ["lambda", "top level", "def"]),
    (
        "nested function",
        lambda: P(_outer(), 1),
        UnsendableError,
        ["defined inside _outer()", "Move it to the top level"],
    ),
    (
        "bound method",
        lambda: P(Holder().method, 1),
        UnsendableError,
        ["Holder.method", "bound method", "top-level function"],
    ),
    (
        "bound method of a test class",
        lambda: P(_Local().method, 1),
        UnsendableError,
        ["_Local.method", "top-level function"],
    ),
    (
        "partial",
        lambda: P(functools.partial(plain_add, 1), 2),
        UnsendableError,
        ["not a plain function", "top-level function", "@ordered_task"],
    ),
    (
        "unencodable argument",
        lambda: P(echo, object()),
        UnsendableError,
        ["cannot encode the arguments of tests.apps.tasks.echo", "'json'", "serializer"],
    ),
    (
        "unencodable keyword argument",
        lambda: P(plain_add, 1, y={1, 2}),
        UnsendableError,
        ["cannot encode", "'json'", "serializer"],
    ),
    (
        "unencodable marker",
        lambda: P(object()),
        UnsendableError,
        ["cannot encode the marker", "'json'"],
    ),
    (
        "plain celery task",
        lambda: P(plain_celery_add, 1, 2),
        UnsendableError,
        ["plain Celery task", "@celery_ordered.ordered_task", "OrderedTask"],
    ),
    (
        "signature of a plain celery task",
        lambda: P(plain_celery_add.s(1, 2)),
        UnsendableError,
        ["plain Celery task", "ordered_task"],
    ),
    (
        "chain",
        lambda: P(echo.s(1) | echo.s()),
        UnsendableError,
        ["celery.chain", "plain Celery task"],
    ),
    (
        "stdlib function",
        lambda: P(os.getcwd),
        UnsendableError,
        ["standard-library", "ordered_function_modules", "@ordered_task"],
    ),
    (
        "builtin",
        lambda: P(len, [1, 2]),
        UnsendableError,
        ["'builtins'", "ordered_function_modules"],
    ),
    (
        "too many arguments for a task",
        lambda: P(echo, 1, 2),
        UnsendableError,
        ["tests.apps.tasks.echo(value)", "too many positional arguments", "Fix the arguments"],
    ),
    (
        "unknown keyword argument of a task",
        lambda: P(echo.s(1), nope=2),
        UnsendableError,
        ["tests.apps.tasks.echo(value)", "'nope'"],
    ),
    (
        "missing argument of a function",
        lambda: P(plain_add),
        UnsendableError,
        ["tests.apps.tasks.plain_add(x", "missing a required argument", "Fix the arguments"],
    ),
    (
        "marker with arguments",
        lambda: P("marker", 1),
        ValueError,
        ["not callable", "marker takes no arguments"],
    ),
    (
        "marker with keyword arguments",
        lambda: P({"a": 1}, b=2),
        ValueError,
        ["marker takes no arguments"],
    ),
    (
        "negative timeout",
        lambda: P(echo, 1, timeout=-1),
        ValueError,
        ["timeout must be", ">= 0", "-1"],
    ),
    (
        "timeout of the wrong type",
        lambda: P(echo, 1, timeout="5"),
        ValueError,
        ["timeout must be", "'5'"],
    ),
    (
        "boolean timeout",
        lambda: P(echo, 1, timeout=True),
        ValueError,
        ["timeout must be"],
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [pytest.param(make, error, words, id=name) for name, make, error, words in BAD_PUTS],
)
def test_bad_put_is_refused_and_leaves_no_gap(make_stream, make, error, words):
    stream = make_stream(window=8)
    stream.put(echo, "before")
    args, kwargs = make()
    with pytest.raises(error) as info:
        stream.put(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if error is UnsendableError:
        assert isinstance(info.value, TypeError)
        assert info.value.seq is None  # refused before a number was claimed
    assert stream.stats().claimed == 1
    _assert_no_gap(stream, 1)


def test_static_method_of_a_top_level_class_is_accepted(make_stream):
    # The contrast to the bound method: importable by name, so it may go.
    stream = make_stream(window=4)
    stream.put(Holder.static, 7)
    stream.close()
    assert list(stream) == [7]


BOUND_IN_MAIN = """
import os
from celery import Celery
from celery_ordered import OrderedResultStream, UnsendableError

class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return self.factor * x

app = Celery("bound", set_as_current=False)
app.conf.ordered_redis_url = os.environ["CO_TEST_REDIS_URL"]
stream = OrderedResultStream(app, window=4)
try:
    stream.put(Scaler(10).scale, 3)
except UnsendableError as exc:
    print("REFUSED", exc)
print("CLAIMED", stream.stats().claimed)
stream.delete()
"""


def test_a_bound_method_of_a_script_is_refused_too(tmp_path):
    # A worker would call Scaler.scale(3): 3 in the place of self, a wrong
    # result or a TypeError far from the put that caused it.
    script = tmp_path / "script.py"
    script.write_text(BOUND_IN_MAIN)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED put() got __main__.Scaler.scale, a bound method (of a Scaler)" in done.stdout
    assert "CLAIMED 0" in done.stdout


def test_stdlib_allowed_by_the_producer_is_still_refused_by_the_worker(make_stream, app):
    # The producer's app lists the module; the workers' app (tests.apps.celeryapp,
    # in another process) does not, so the worker refuses at the position.
    module = os.getcwd.__module__
    stream = make_stream(window=4)
    app.conf.ordered_function_modules = [module, "tests"]
    try:
        stream.put(echo, "before")
        refused = stream.put(os.getcwd)
        stream.put(plain_add, 1, 2)
        with pytest.raises(UnsendableError, match="ordered_function_modules"):
            # Listing modules admits only those: others are refused now.
            stream.put(OrderedResultStream)
    finally:
        app.conf.pop("ordered_function_modules", None)
    assert app.conf.get("ordered_function_modules") is None
    stream.close()
    assert stream.get(timeout=30) == "before"
    with pytest.raises(PermissionError, match="ordered_function_modules") as info:
        stream.get(timeout=30)
    assert info.value.seq == refused
    assert module in str(info.value)
    assert stream.get(timeout=30) == 3
    assert list(stream) == []
    assert stream.stats().claimed == 3


def test_put_after_close_is_refused_and_claims_nothing(make_stream):
    stream = make_stream(window=4)
    stream.put(echo, "before")
    stream.close()
    with pytest.raises(StreamClosedError, match="open a new stream") as info:
        stream.put(echo, "late")
    assert isinstance(info.value, ValueError)
    assert info.value.stream == stream.name
    assert stream.stats().claimed == 1
    assert list(stream) == ["before"]


# -- construction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        pytest.param("", ValueError, ["empty", "name=None"], id="empty"),
        pytest.param("x" * 201, ValueError, ["201 characters", "200"], id="too long"),
        pytest.param("a{b}c", ValueError, ["'{}'", "letters, digits"], id="braces"),
        pytest.param("a b", ValueError, ["' '", "letters, digits"], id="space"),
        pytest.param("a*b?", ValueError, ["'*?'"], id="glob"),
        pytest.param("line\nbreak", ValueError, ["'\\n'"], id="newline"),
        pytest.param(123, TypeError, ["must be a str", "int"], id="int"),
        pytest.param(b"bytes", TypeError, ["must be a str", "bytes"], id="bytes"),
    ],
)
def test_bad_stream_name_is_refused_and_writes_nothing(app, redis_client, name, error, words):
    with pytest.raises(error) as info:
        OrderedResultStream(app, name, window=4)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    if isinstance(name, str) and name:
        assert redis_client.keys(f"co:{{{name}}}:*") == []


@pytest.mark.parametrize(
    "name",
    ["x" * 200, "a.b:c@d+e=f-g_h", "UPPER-lower-0123"],
    ids=["200 chars", "every allowed punctuation", "mixed"],
)
def test_good_stream_names_work(make_stream, name):
    name = name if len(name) == 200 else f"{name}-{uuid.uuid4().hex[:8]}"
    stream = make_stream(name=name, window=4)
    stream.put(echo, name)
    stream.close()
    assert list(stream) == [name]


BAD_WINDOWS = [
    pytest.param(0, ValueError, ["an int >= 1", "got 0", "ahead of the consumer"], id="zero"),
    pytest.param(-3, ValueError, ["an int >= 1", "got -3"], id="negative"),
    pytest.param(1_000_001, ValueError, ["1000001", "1000000", "bounds memory"], id="too large"),
    pytest.param(2.5, TypeError, ["must be an int", "float"], id="float"),
    pytest.param("8", TypeError, ["must be an int", "str"], id="str"),
    pytest.param(True, TypeError, ["must be an int", "bool"], id="bool"),
]


@pytest.mark.parametrize(("window", "error", "words"), BAD_WINDOWS)
def test_bad_window_is_refused_by_the_constructor(app, redis_client, window, error, words):
    name = f"test-{uuid.uuid4().hex}"
    with pytest.raises(error) as info:
        OrderedResultStream(app, name, window=window)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert redis_client.keys(f"co:{{{name}}}:*") == []


@pytest.mark.parametrize(("window", "error", "words"), BAD_WINDOWS)
def test_bad_window_is_refused_by_set_window_and_the_stream_goes_on(
    make_stream, window, error, words
):
    stream = make_stream(window=2)
    stream.put(echo, "before")
    with pytest.raises(error) as info:
        stream.set_window(window)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert stream.window == 2
    _assert_no_gap(stream, 1)


def test_largest_window_is_accepted(make_stream):
    stream = make_stream(window=1_000_000)
    assert stream.window == 1_000_000


def test_both_redis_url_and_client_is_a_configuration_error(app, redis_url, redis_client):
    with pytest.raises(ConfigurationError, match="both redis_url= and client=") as info:
        OrderedResultStream(app, window=4, redis_url=redis_url, client=redis_client)
    assert isinstance(info.value, ImproperlyConfigured)


def test_non_redis_url_is_a_configuration_error(app):
    with pytest.raises(ConfigurationError, match="not a Redis URL"):
        OrderedResultStream(app, window=4, redis_url="amqp://guest@localhost//")


def test_unknown_serializer_is_a_configuration_error(app):
    with pytest.raises(ConfigurationError, match="not registered with kombu"):
        OrderedResultStream(app, window=4, serializer="no-such-serializer")


@pytest.mark.parametrize("prefetch", [0, -1, 1.5, True])
def test_bad_prefetch_is_refused(app, prefetch):
    with pytest.raises(ValueError, match="prefetch must be an int >= 1"):
        OrderedResultStream(app, window=4, prefetch=prefetch)


def test_stream_on_an_explicit_client_works(app, make_stream, redis_url):
    client = redis.Redis.from_url(redis_url)
    stream = make_stream(window=4, client=client)
    stream.put(echo, "via client")
    stream.close()
    assert list(stream) == ["via client"]


@pytest.mark.parametrize("call", ["get", "join"])
@pytest.mark.parametrize("timeout", [-0.5, "1", False, float("nan"), float("inf")])
def test_bad_timeouts_on_get_and_join(make_stream, call, timeout):
    stream = make_stream(window=4)
    stream.put("m")
    with pytest.raises(ValueError, match="timeout must be None"):
        getattr(stream, call)(timeout=timeout)
    stream.close()
    assert list(stream) == ["m"]


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("lost_after", -1),
        ("lost_after", 0),
        ("lost_after", "3"),
        ("lost_after", True),
        ("lost_after", float("inf")),
        ("lost_after", float("nan")),
        ("ack_every", 0),
        ("ack_every", 2.5),
        ("ack_every", True),
        ("max_redispatches", -1),
        ("max_redispatches", "3"),
        ("prefetch", float("nan")),
        ("consumer_lease", 0),
        ("consumer_lease", float("inf")),
    ],
)
def test_each_numeric_argument_is_checked_at_the_constructor_by_its_own_name(
    app, redis_client, argument, value
):
    # Each refusal names the argument it is about (lost_after=-1 was refused
    # with a message about `timeout`), and nothing reaches Redis.
    name = f"test-bad-{uuid.uuid4().hex}"
    with pytest.raises(ValueError, match=rf"^{argument} must be .*got {re.escape(repr(value))}"):
        OrderedResultStream(app, name, window=4, **{argument: value})
    assert list(redis_client.scan_iter(f"co:{{{name}}}:*")) == []


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        (("my-stream",), {}, ["first argument is the Celery app", "'my-stream'", "name="]),
        ((), {"task_options": "reports"}, ["task_options must be a dict", "'reports'"]),
    ],
    ids=["name-for-app", "task_options-not-a-dict"],
)
def test_the_constructor_names_a_misplaced_argument(app, args, kwargs, words):
    with pytest.raises(TypeError) as info:
        OrderedResultStream(*(args or (app,)), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_nan_timeout_is_refused_before_redis_and_the_stream_goes_on(make_stream):
    # get(timeout=nan) reached Redis and raised redis-py's raw ResponseError.
    stream = make_stream(window=4)
    stream.put("m")
    for call in (stream.get, stream.join, lambda timeout: stream.put("n", timeout=timeout)):
        with pytest.raises(ValueError, match=r"timeout must be None \(no limit\) or a finite"):
            call(timeout=float("nan"))
    stream.close()
    assert list(stream) == ["m"]
