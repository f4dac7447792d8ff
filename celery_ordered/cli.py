"""The ``celery-ordered`` command (also ``python -m celery_ordered``)."""

from __future__ import annotations

import sys

import click

from . import __version__
from .commands import ordered
from .redis.urls import mask_url


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

    if documents < 1 or batch_size < 1:
        raise click.BadParameter("--documents and --batch-size must be at least 1")
    if broker_url or redis_url:
        if not (broker_url and redis_url):
            raise click.UsageError(
                "a fleet run needs both --broker-url and --redis-url (the Redis that "
                "holds the stream may be the broker's)"
            )
        demo_app.conf.update(broker_url=broker_url, ordered_redis_url=redis_url)
        click.echo(f"Running on the fleet behind {mask_url(broker_url)}")
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
    else:
        from .embedded import local_cluster

        click.echo("Starting a private Redis and local Celery workers...")
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
    for line in report.lines():
        click.echo(line)
    if not report.in_order:
        sys.exit(1)


main.add_command(ordered)


if __name__ == "__main__":  # pragma: no cover
    main()
