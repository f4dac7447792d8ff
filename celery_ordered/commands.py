"""``celery ordered ...``: look at and steer streams from the command line.

Plugged into Celery's own command through the ``celery.commands`` entry
point, so ``celery -A proj ordered ls`` finds the Redis from the app's
settings; also part of the standalone ``celery-ordered`` command, where
``--redis-url`` says which Redis.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import click
from celery import Celery

from .config import redis_client
from .errors import OrderedStreamError, StreamNotFound
from .keys import KEY_PREFIX, name_from_key
from .progress import progress_bar
from .stream import OrderedResultStream, StreamStats


class _Target:
    """The app and Redis the commands work on."""

    def __init__(self, app: Celery, redis_url: str | None) -> None:
        self.app = app
        self.redis_url = redis_url

    def client(self) -> Any:
        return redis_client(self.app, self.redis_url)

    def names(self) -> list[str]:
        found = {
            name_from_key(key)
            for key in self.client().scan_iter(match=f"{KEY_PREFIX}:{{*}}:window", count=1000)
        }
        return sorted(name for name in found if name)

    def open(self, name: str) -> OrderedResultStream:
        """The existing stream ``name``; raises :class:`StreamNotFound`."""
        return OrderedResultStream(self.app, name, redis_url=self.redis_url, create=False)

    def stream(self, name: str) -> OrderedResultStream:
        try:
            return self.open(name)
        except StreamNotFound:
            raise click.ClickException(f"no stream named {name!r} in this Redis") from None


def _describe(stats: StreamStats) -> str:
    state = "closed" if stats.closed else "open"
    return (
        f"{stats.delivered}/{stats.claimed} delivered, {stats.in_flight} in flight, "
        f"{stats.buffered} buffered ({stats.out_of_order} out of order), "
        f"window {stats.window}, {state}"
    )


@click.group(name="ordered")
@click.option("--redis-url", default=None, help="Redis holding the streams [default: the app's].")
@click.pass_context
def ordered(ctx: click.Context, redis_url: str | None) -> None:
    """Look at and steer celery-ordered streams."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        app = Celery("celery_ordered.cli", set_as_current=False)
    ctx.meta["celery_ordered"] = _Target(app, redis_url)


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
        except StreamNotFound:
            continue  # deleted, or expired, since the scan: no longer there to list
        click.echo(f"{name:<{width}}  {_describe(stats)}")


@ordered.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show one stream's counters and its head-of-line blocker."""
    stats = _target(ctx).stream(name).stats()
    rows = [
        ("claimed", stats.claimed),
        ("delivered", stats.delivered),
        ("in flight", stats.in_flight),
        ("buffered", stats.buffered),
        ("out of order", stats.out_of_order),
        ("window", stats.window),
        ("closed", "yes" if stats.closed else "no"),
    ]
    if stats.blocker is None:
        rows.append(("blocker", "none: nothing is missing"))
    else:
        waited = "" if stats.blocker_waited is None else f", waiting {stats.blocker_waited:.1f} s"
        rows.append(("blocker", f"number {stats.blocker}{waited}"))
    for label, value in rows:
        click.echo(f"{label:<13} {value}")


@ordered.command()
@click.argument("name")
@click.option("--interval", default=0.5, show_default=True, help="Seconds between refreshes.")
@click.option("--count", type=int, default=None, help="Stop after this many refreshes.")
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
    """A live view of one stream: progress bar and throughput, until it is done."""
    stream = _target(ctx).stream(name)
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
                live.set_total(stats.claimed)
                live.update(stats.delivered)
            else:
                elapsed = time.monotonic() - began
                rate = (stats.delivered - first) / elapsed if elapsed > 0 else 0.0
                filled = 30 * stats.delivered // max(stats.claimed, 1)
                line = "#" * filled + "." * (30 - filled)
                click.echo(f"[{line}] {_describe(stats)}, {rate:,.0f}/s")
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


@ordered.command()
@click.argument("name")
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
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, name: str, yes: bool) -> None:
    """Delete every key of a stream (late results are then dropped)."""
    stream = _target(ctx).stream(name)
    if not yes:
        click.confirm(f"Delete stream {name} and all it holds?", abort=True)
    stream.delete()
    click.echo(f"deleted {name}")
