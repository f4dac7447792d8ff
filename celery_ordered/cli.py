"""The ``celery-ordered`` command (also ``python -m celery_ordered``)."""

from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__
from .commands import ordered
from .config import MAX_WINDOW
from .errors import OrderedStreamError
from .redis.urls import check_broker_url, mask_url, one_line, tls_hint


def _check_fleet(app: Any, broker_url: str, redis_url: str) -> None:
    """Fail at once, in one line, on a Redis or a broker a fleet run could not use.

    Without this, an unreachable Redis took ``ordered_redis_retry_for`` (20 s)
    and a broker that refused the run surfaced as a traceback at the first put.
    """
    import redis

    from .config import redis_client

    try:
        redis_client(app, redis_url, fail_fast=True).ping()
    except (OrderedStreamError, redis.RedisError) as exc:
        raise click.ClickException(
            f"--redis-url {mask_url(redis_url)!r}: {one_line(exc)}: "
            f"{tls_hint(redis_url, exc) or 'start that Redis, or fix the URL'}"
        ) from None
    try:
        check_broker_url(broker_url)
    except OrderedStreamError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker-url") from None
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0)
    except Exception as exc:  # kombu's errors differ by transport (an unknown one is a KeyError)
        raise click.ClickException(
            f"--broker-url {mask_url(broker_url)!r}: cannot connect ({one_line(exc)}): start "
            "the broker, or fix the URL"
        ) from None


@click.group()
@click.version_option(__version__, prog_name="celery-ordered")
def main() -> None:
    """celery-ordered: run Celery tasks in parallel, get results in order."""


@main.command()
@click.option("--documents", default=2000, show_default=True, help="Documents to index.")
@click.option("--batch-size", default=100, show_default=True, help="Documents per batch.")
@click.option(
    "--workers", type=int, default=None, help="Local worker processes [default: CPU count]."
)
@click.option("--window", type=int, default=None, help="Window cap [default: 10 x workers].")
@click.option("--seed", default=7, show_default=True, help="Seed of the documents' costs.")
@click.option(
    "--broker-url",
    default=None,
    help="Run on a fleet: the Celery broker its workers "
    "(celery -A celery_ordered.demo worker) consume from.",
)
@click.option("--redis-url", default=None, help="Run on a fleet: the Redis that holds the stream.")
@click.option("--quiet-batches", is_flag=True, help="Do not print a line per batch.")
def demo(
    documents: int,
    batch_size: int,
    workers: int | None,
    window: int | None,
    seed: int,
    broker_url: str | None,
    redis_url: str | None,
    quiet_batches: bool,
) -> None:
    """Index documents in parallel and log each batch, in order.

    With no URL, runs on a private Redis and local worker processes.
    """
    from .demo import app as demo_app
    from .demo import run_demo

    sizes = {"--documents": documents, "--batch-size": batch_size, "--workers": workers,
             "--window": window}  # fmt: skip
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise click.BadParameter(f"{flag} must be at least 1, got {value}")
    if window is not None and window > MAX_WINDOW:
        raise click.BadParameter(f"--window must be at most {MAX_WINDOW:,}, got {window}")
    if broker_url or redis_url:
        if not (broker_url and redis_url):
            raise click.UsageError(
                "a fleet run needs both --broker-url and --redis-url (the Redis that "
                "holds the stream may be the broker's)"
            )
        demo_app.conf.update(broker_url=broker_url, ordered_redis_url=redis_url)
        _check_fleet(demo_app, broker_url, redis_url)
        click.echo(f"Running on the fleet behind {mask_url(broker_url)}")
        try:
            report = run_demo(
                demo_app,
                documents=documents,
                batch_size=batch_size,
                window=window,
                seed=seed,
                workers_label="the fleet's (celery -A celery_ordered.demo worker)",
                startup=None,
                quiet_batches=quiet_batches,
            )
        except OrderedStreamError as exc:  # the fleet failed the run: one line, no traceback
            raise click.ClickException(one_line(exc)) from None
    else:
        from .embedded import local_cluster

        click.echo("Starting a private Redis and local Celery workers...")
        try:
            with local_cluster(workers) as cluster:
                click.echo(
                    f"Ready in {cluster.startup_seconds:.2f} s: {cluster.workers} worker "
                    f"processes, Redis at {cluster.redis.url}"
                )
                report = run_demo(
                    cluster.app,
                    documents=documents,
                    batch_size=batch_size,
                    window=window if window is not None else 10 * cluster.workers,
                    seed=seed,
                    workers_label=f"{cluster.workers} local processes (embedded Redis)",
                    startup=cluster.startup_seconds,
                    quiet_batches=quiet_batches,
                )
        except OrderedStreamError as exc:  # it could not start, or its Redis died: one line
            raise click.ClickException(one_line(exc)) from None
    for line in report.lines():
        click.echo(line)
    if not report.in_order:
        sys.exit(1)


main.add_command(ordered)


if __name__ == "__main__":  # pragma: no cover
    main()
