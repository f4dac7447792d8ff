"""No password in any message, repr or CLI output (issue 11, item 15)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from celery import Celery

from celery_ordered import ConfigurationError, OrderedResultStream
from celery_ordered.redis.urls import mask_url, parse_redis_url, socket_url
from tests.support import ROOT

SECRET = "Pa55-w0rd"

#: Every form a password takes in a URL, with the text that must still show.
URLS = [
    (f"redis://:{SECRET}@db.example:6379/0", "redis://:***@db.example:6379/0"),
    (f"redis://alice:{SECRET}@db.example/0", "redis://alice:***@db.example/0"),
    (f"redis://:x@{SECRET}@db.example:6379/0", "redis://:***@db.example:6379/0"),
    (f"redis://:a:{SECRET}@db.example/0", "redis://:***@db.example/0"),
    (f"redis://db.example:6379/0?password={SECRET}&db=1", "?password=***&db=1"),
    (f"unix:///run/redis.sock?db=2&password={SECRET}", "unix:///run/redis.sock?db=2&password=***"),
    (f"rediss+cluster://:{SECRET}@n1:7000,n2:7001", "rediss+cluster://:***@n1:7000,n2:7001"),
    (
        f"sentinel://:{SECRET}@s1:26379;sentinel://:{SECRET}@s2:26379/0",
        "sentinel://:***@s1:26379;sentinel://:***@s2:26379/0",
    ),
    (
        f"sentinel://s1:26379/0?master_name=m&sentinel_password={SECRET}",
        "?master_name=m&sentinel_password=***",
    ),
]


@pytest.mark.parametrize(("url", "shown"), URLS, ids=range(len(URLS)))
def test_mask_url_hides_every_form_of_password(url: str, shown: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked
    assert shown in masked


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:x@{SECRET}@db.example:notaport/0",  # unencoded "@", bad port
        f"redis+cluster://:{SECRET}@n1:7000/3",  # a database a cluster lacks
        f"sentinel://:{SECRET}@s1:26379?sentinel_password={SECRET}",  # unknown option
        f"sentinel://:{SECRET}@s1;redis://:{SECRET}@x",  # a part that is no Sentinel
        f"http://:{SECRET}@db.example/0?password={SECRET}",  # not Redis at all
    ],
)
def test_errors_about_a_url_never_show_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        OrderedResultStream(Celery("bad", set_as_current=False), redis_url=url)
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value)


@pytest.mark.parametrize("cut", ["/", "?", "#"])
@pytest.mark.parametrize(
    "url",
    [
        "redis://:{a}{cut}{b}@127.0.0.1:6399/0",
        "redis://user:{a}{cut}{b}@127.0.0.1:6399/0",
        "redis+cluster://:{a}{cut}{b}@127.0.0.1:7000",
        "sentinel://user:{a}{cut}{b}@127.0.0.1:26379/0?master_name=m",
        "redis://:4711{cut}{b}@127.0.0.1:6399/0",  # would connect to localhost:4711
        "redis://default:{a}{cut}{b}==@127.0.0.1:6399/0",  # base64's "=" at the end
    ],
)
def test_a_password_that_url_parsing_would_cut_is_refused_without_quoting_it(
    url: str, cut: str
) -> None:
    # Given a password holding a character that ends a URL's host part, unencoded
    first, second = SECRET[:4], SECRET[4:]
    template, url = url, url.format(a=first, b=second, cut=cut)
    # Then the URL is refused, saying how to write it, and no part of the password shows
    with pytest.raises(ConfigurationError, match="percent-encode") as raised:
        OrderedResultStream(Celery("bad", set_as_current=False), redis_url=url)
    for shown in (str(raised.value), repr(raised.value)):
        assert first not in shown
        assert second not in shown
        assert "4711" not in shown
    # And the same password, percent-encoded, is taken
    encoded = template.format(a=first, b=second, cut={"/": "%2F", "?": "%3F", "#": "%23"}[cut])
    assert parse_redis_url(encoded).url == encoded


@pytest.mark.parametrize(
    "url",
    [
        f"redis://127.0.0.1:6379/0?password={SECRET}@x/y",  # "@" and "/" in a query argument
        "unix:///run/redis/redis-server@main.sock?db=1",  # "@" in a socket's path
        "redis+socket:///run/redis@main/redis.sock?db=2",
        f"redis://user:{SECRET}@[::1]:6379/3",
        f"rediss://:{SECRET}@db.example:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
    ],
)
def test_urls_redis_py_reads_as_meant_are_taken(url: str) -> None:
    assert parse_redis_url(url).url == socket_url(url)


def test_options_a_connection_does_not_take_are_named_with_the_fix() -> None:
    cases = {
        "redis://db.example/0?ssl_cert_reqs=none": "TLS options need a rediss:// URL",
        "unix:///run/redis.sock?socket_keepalive=true": "socket_keepalive",
        "redis+socket:///run/redis.sock?virtual_host=2": "?db=N",
        "redis://db.example/0?timeout=3": "timeout",
    }
    for url, expected in cases.items():
        with pytest.raises(ConfigurationError, match="not taken by a") as raised:
            parse_redis_url(url)
        assert expected in str(raised.value)


def test_a_broker_url_that_would_cut_its_password_is_refused_by_the_stream(
    redis_url: str,
) -> None:
    app = Celery("bad", set_as_current=False, broker="amqp://guest:Pa55/w0rd@127.0.0.1:5672//")
    with pytest.raises(ConfigurationError, match=r"broker URL.*percent-encode") as raised:
        OrderedResultStream(app, redis_url=redis_url)
    assert "Pa55" not in str(raised.value)
    assert "w0rd" not in str(raised.value)
    # A transport that hands its URL on whole (SQLAlchemy's) is left to parse it
    app.conf.broker_url = "sqla+postgresql://scott:ti/ger@localhost/db"
    OrderedResultStream(app, redis_url=redis_url).delete()


def test_badly_typed_sentinel_options_are_named_without_their_values() -> None:
    # Given Sentinel options holding the Sentinels' password, mistyped (a
    # string read from the environment where an int belongs)
    app = Celery("bad", set_as_current=False)
    app.conf.ordered_redis_url = "sentinel://127.0.0.1:26399/0?master_name=m"
    for kwargs, other in (({"password": SECRET}, "1"), ([("password", SECRET)], 0)):
        app.conf.ordered_redis_transport_options = {
            "sentinel_kwargs": kwargs,
            "min_other_sentinels": other,
        }
        # Then the error names what is wrong, and shows no value of sentinel_kwargs
        with pytest.raises(ConfigurationError, match="sentinel_kwargs must be a dict") as raised:
            OrderedResultStream(app)
        assert SECRET not in str(raised.value)
        assert SECRET not in repr(raised.value)


def test_a_parsed_url_shows_no_password_in_its_repr() -> None:
    for url in (f"redis://:{SECRET}@db/0", f"sentinel://:{SECRET}@s1/0?master_name=m"):
        target = parse_redis_url(url)
        assert SECRET not in repr(target)
        assert "***" in repr(target)


def test_celery_hides_ordered_redis_url_in_its_configuration_tables() -> None:
    app = Celery("secrets", set_as_current=False)
    app.conf.ordered_redis_url = f"redis://:{SECRET}@db.example:6379/0"
    assert SECRET not in app.conf.humanize()
    assert SECRET not in repr(app.conf.table(censored=True))
    assert app.conf.table(censored=True)["ordered_redis_url"] == "********"
    assert app.conf.ordered_redis_url.endswith("@db.example:6379/0")  # usable as it was


def test_celery_report_and_the_cli_show_no_password() -> None:
    # Given an app whose streams' Redis URL carries passwords in every form
    # (nothing listens there: the report never connects, the CLI fails)
    app_code = f"""
        from celery import Celery

        app = Celery("secretapp")
        app.conf.update(
            broker_url="memory://",
            ordered_redis_url="redis://:{SECRET}@x@127.0.0.1:1/0?password={SECRET}",
            ordered_redis_transport_options={{"sentinel_kwargs": {{"password": "{SECRET}"}}}},
        )
    """
    with tempfile.TemporaryDirectory(prefix="co-secretapp-") as where:
        Path(where, "secretapp.py").write_text(textwrap.dedent(app_code))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([where, str(ROOT)])}

        def celery(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "celery", "-A", "secretapp", *args],
                cwd=where, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        report = celery("report")
        listing = celery("ordered", "ls")
    # Then `celery report` lists the setting, masked
    assert report.returncode == 0, report.stderr
    assert "ordered_redis_url: '********'" in report.stdout
    assert SECRET not in report.stdout + report.stderr
    # And the CLI's error names the Redis without the password
    assert listing.returncode != 0
    assert "127.0.0.1:1" in listing.stderr
    assert SECRET not in listing.stdout + listing.stderr
