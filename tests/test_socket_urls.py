"""A unix socket spelled two ways: ``unix://`` (redis-py) and ``redis+socket://`` (kombu).

One function, :func:`celery_ordered.redis.urls.socket_url`, turns one into
the other; the URL readers and the embedded server go through it.
"""

from __future__ import annotations

import pytest

from celery_ordered.redis.urls import as_redis_url, parse_redis_url, socket_url


@pytest.mark.parametrize(
    ("url", "for_redis_py", "for_kombu"),
    [
        ("unix:///tmp/r.sock", "unix:///tmp/r.sock", "redis+socket:///tmp/r.sock"),
        ("redis+socket:///tmp/r.sock", "unix:///tmp/r.sock", "redis+socket:///tmp/r.sock"),
        (
            "unix:///run/r.sock?db=2&password=x",
            "unix:///run/r.sock?db=2&password=x",
            "redis+socket:///run/r.sock?db=2&password=x",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sentinel://h:26379", "sentinel://h:26379", "sentinel://h:26379"),
    ],
)
def test_socket_url_spells_a_socket_for_each_client(
    url: str, for_redis_py: str, for_kombu: str
) -> None:
    assert socket_url(url) == for_redis_py
    assert socket_url(url, kombu=True) == for_kombu
    assert socket_url(socket_url(url, kombu=True)) == for_redis_py


def test_the_readers_take_kombus_spelling_as_redis_pys() -> None:
    assert as_redis_url(" redis+socket:///tmp/r.sock?db=3 ") == "unix:///tmp/r.sock?db=3"
    target = parse_redis_url("redis+socket:///tmp/r.sock?db=3")
    assert (target.kind, target.node_url) == ("single", "unix:///tmp/r.sock?db=3")
