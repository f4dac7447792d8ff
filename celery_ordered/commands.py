"""``celery ordered ...``: look at and steer streams from the command line.

Plugged into Celery's own command through the ``celery.commands`` entry
point, so ``celery -A proj ordered ls`` finds the Redis from the app's
settings; also part of the standalone ``celery-ordered`` command, where
``--redis-url`` says which Redis.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click
import redis
from celery import Celery
from redis.exceptions import AuthorizationError

from .config import redis_client, resolve_redis
from .errors import (
    ConfigurationError,
    OrderedStreamError,
    RedisUnavailable,
    StreamDeleted,
    StreamNotFound,
)
from .progress import progress_bar
from .redis.keys import KEY_PREFIX, name_from_key, validate_name
from .redis.urls import mask_url, one_line, tls_hint
from .stream import OrderedResultStream, StreamStats

#: How the commands are told which Redis to look in.
_FLAG_HINT = "--redis-url redis://host:6379/0 (given before the subcommand)"


class _Target:
    """The app and Redis the commands work on."""

    def __init__(self, app: Celery, redis_url: str | None) -> None:
        self.app = app
        self.redis_url = redis_url

    def client(self) -> Any:
        # A Redis that never answered fails in about a second, not after
        # ordered_redis_retry_for: nobody waits 20 s to learn Redis is not there.
        return redis_client(self.app, self.redis_url, fail_fast=True)

    def names(self) -> list[str]:
        found = {
            name_from_key(key)
            for key in self.client().scan_iter(match=f"{KEY_PREFIX}:{{*}}:window", count=1000)
        }
        return sorted(name for name in found if name)

    def open(self, name: str) -> OrderedResultStream:
        """The existing stream ``name``; raises :class:`StreamNotFound`."""
        return OrderedResultStream(self.app, name, client=self.client(), create=False)

    def stream(self, name: str) -> OrderedResultStream:
        try:
            return self.open(name)
        except StreamNotFound:
            raise click.ClickException(f"no stream named {name!r} in this Redis") from None

    def where(self) -> str:
        """The Redis the commands look in, for messages: no password in it."""
        try:
            return mask_url(resolve_redis(self.app, self.redis_url)[0])
        except ConfigurationError:
            return mask_url(self.redis_url or "?")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _one_line(target: _Target | None, exc: BaseException) -> str:
    """What went wrong with Redis or the settings, and the fix, as one line."""
    where = target.where() if target is not None else "?"
    if isinstance(exc, ConfigurationError):
        text = mask_url(exc)
        if target is not None and target.redis_url is not None:
            return f"--redis-url {mask_url(target.redis_url)!r}: {text}"
        text = text.replace(", or pass redis_url= to OrderedResultStream", "")
        return f"{text}; or give the commands {_FLAG_HINT}"
    causes = list(_causes(exc))
    refused = next(
        (c for c in causes if isinstance(c, (redis.AuthenticationError, AuthorizationError))),
        None,
    )
    if refused is not None:
        return (
            f"Redis at {where} refused the credentials "
            f"({one_line(refused)}): fix the user "
            f"and password in the URL given with {_FLAG_HINT}, or in ordered_redis_url"
        )
    down = next(
        (c for c in causes if isinstance(c, (redis.ConnectionError, redis.TimeoutError))), None
    )
    if down is not None:
        fix = tls_hint(where, down) or (
            f"start it, or point the command at the Redis holding the streams with {_FLAG_HINT}"
        )
        return f"cannot reach Redis at {where} ({one_line(down)}): {fix}"
    garbled = next((c for c in causes if isinstance(c, redis.exceptions.InvalidResponse)), None)
    if garbled is not None:
        return (
            f"the server at {where} does not answer as Redis does "
            f"({one_line(garbled)}): is it another server's port? Point "
            f"the command at the Redis holding the streams with {_FLAG_HINT}"
        )
    refused_command = next((c for c in causes if isinstance(c, redis.ResponseError)), None)
    if refused_command is not None:
        reason = one_line(refused_command)
        if "DB index" in reason:
            return (
                f"Redis at {where} has no such database ({reason}): fix the database "
                f"number in the URL given with {_FLAG_HINT}, or in ordered_redis_url"
            )
        return f"Redis at {where} refused the command ({reason})"
    return mask_url(exc)


class _OrderedGroup(click.Group):
    """``ordered``: a Redis that is down or refuses the password is one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; Redis and setting errors become a one-line ``Error:``."""
        try:
            return super().invoke(ctx)
        except StreamDeleted as exc:  # purged or expired while the command looked at it
            raise click.ClickException(f"stream {exc.stream!r} was deleted") from None
        except (ConfigurationError, RedisUnavailable, redis.RedisError) as exc:
            target = ctx.meta.get("celery_ordered")
            raise click.ClickException(_one_line(target, exc)) from None


def _describe(stats: StreamStats) -> str:
    state = "closed" if stats.closed else "open"
    return (
        f"{stats.delivered}/{stats.claimed} delivered, {stats.in_flight} in flight, "
        f"{stats.buffered} buffered ({stats.out_of_order} out of order), "
        f"window {stats.window}, {state}"
    )


@click.group(name="ordered", cls=_OrderedGroup)
@click.option("--redis-url", default=None, help="Redis holding the streams [default: the app's].")
@click.pass_context
def ordered(ctx: click.Context, redis_url: str | None) -> None:
    """Look at and steer celery-ordered streams."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        app = Celery("celery_ordered.cli", set_as_current=False)
    ctx.meta["celery_ordered"] = _Target(app, redis_url)


def _stream_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A NAME argument, checked as a stream name: a bad one is a usage error, not a traceback."""
    try:
        return validate_name(value)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None


def _target(ctx: click.Context) -> _Target:
    target: _Target = ctx.meta["celery_ordered"]
    return target


@ordered.command(name="ls")
@click.pass_context
def list_streams(ctx: click.Context) -> None:
    """List the streams in Redis, with their progress."""
    target = _target(ctx)
    names = target.names()
    if not names:
        click.echo("no streams")
        return
    width = max(len(name) for name in names)
    for name in names:
        try:
            stats = target.open(name).stats()
        except (StreamNotFound, StreamDeleted):
            continue  # deleted, or expired, since the scan: no longer there to list
        click.echo(f"{name:<{width}}  {_describe(stats)}")


@ordered.command()
@click.argument("name", callback=_stream_name)
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show one stream's counters, its head-of-line blocker and what that waits on."""
    stats = _target(ctx).stream(name).stats()
    rows = [
        ("claimed", stats.claimed),
        ("delivered", stats.delivered),
        ("in flight", stats.in_flight),
        ("buffered", stats.buffered),
        ("out of order", stats.out_of_order),
        ("window", f"{stats.window} ({stats.window_why or 'fixed'})"),
        ("closed", "yes" if stats.closed else "no"),
        ("redispatched", stats.redispatched),
        ("lost", stats.lost),
        ("hedged", stats.hedged),
    ]
    if stats.blocker is None:
        rows.append(("blocker", "none: nothing is missing"))
    else:
        waited = "" if stats.blocker_waited is None else f", waiting {stats.blocker_waited:.1f} s"
        rows.append(("blocker", f"number {stats.blocker}{waited}"))
        if stats.diagnosis:
            rows.append(("waits on", stats.diagnosis))
    for label, value in rows:
        click.echo(f"{label:<13} {value}")


@ordered.command()
@click.argument("name", callback=_stream_name)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="Stop after this many refreshes."
)
@click.option(
    "--bar/--lines",
    default=None,
    help="A live progress bar (tqdm when installed), or a line per refresh. "
    "Default: a bar on a terminal, lines elsewhere.",
)
@click.pass_context
def watch(
    ctx: click.Context, name: str, interval: float, count: int | None, bar: bool | None
) -> None:
    """A live view of one stream, until it is done (Ctrl-C stops watching).

    While the stream is open its total is unknown (producers may still put),
    so it shows delivered/claimed-so-far and the rate; the bar and its
    percentage appear once the stream is closed and the total is final.
    """
    # Like watch(1): Ctrl-C ends the watching quietly, with success.
    with contextlib.suppress(KeyboardInterrupt):
        _watch(_target(ctx).stream(name), interval, count, bar)


def _watch(
    stream: OrderedResultStream, interval: float, count: int | None, bar: bool | None
) -> None:
    out = sys.stdout
    if bar is None:
        bar = out.isatty()
    pause = threading.Event()
    began = time.monotonic()
    first = stream.stats().delivered
    shown = 0
    live = progress_bar(desc="delivered", file=out) if bar else None
    stats: StreamStats | None = None
    try:
        while True:
            stats = stream.stats()
            if live is not None:
                if stats.closed:
                    live.set_total(stats.claimed)  # final: the percentage only grows
                live.update(stats.delivered)
            else:
                elapsed = time.monotonic() - began
                rate = (stats.delivered - first) / elapsed if elapsed > 0 else 0.0
                click.echo(f"{_progress_line(stats)}, {rate:,.0f}/s")
            shown += 1
            done = stats.closed and stats.delivered >= stats.claimed
            if done or (count is not None and shown >= count):
                break
            pause.wait(interval)
    finally:
        if live is not None:
            live.close()
            if stats is not None:
                click.echo(_describe(stats))


def _progress_line(stats: StreamStats) -> str:
    """One refresh of ``watch --lines``: a bar only once the total is final."""
    if not stats.closed:
        return _describe(stats)
    filled = 30 * min(stats.delivered, stats.claimed) // max(stats.claimed, 1)
    if stats.claimed == 0:
        filled = 30
    return f"[{'#' * filled}{'.' * (30 - filled)}] {_describe(stats)}"


@ordered.command()
@click.argument("name", callback=_stream_name)
@click.argument("size", type=int)
@click.pass_context
def window(ctx: click.Context, name: str, size: int) -> None:
    """Change a stream's window cap while it runs."""
    stream = _target(ctx).stream(name)
    try:
        stream.set_window(size)
    except (ValueError, TypeError, OrderedStreamError) as exc:
        raise click.BadParameter(str(exc), param_hint="SIZE") from exc
    click.echo(f"window of {name} is now {size}")


@ordered.command()
@click.argument("name", callback=_stream_name)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, name: str, yes: bool) -> None:
    """Delete every key of a stream (late results are then dropped)."""
    stream = _target(ctx).stream(name)
    if not yes:
        click.confirm(f"Delete stream {name} and all it holds?", abort=True)
    stream.delete()
    click.echo(f"deleted {name}")
