"""``python manage.py run_ordered_job``: run a job on the workers, with a progress bar."""

import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from project.celery import app as celery_app

from celery_ordered import StreamExhausted, local_cluster, progress_bar
from jobs.work import start_job


class Command(BaseCommand):
    """Run a job; print each batch once all of it is done, in order."""

    help = (
        "Run a job of --items tasks on the Celery workers. Each batch is reported once "
        "all of it is done, in order, above a progress bar."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--items", type=int, default=40, help="tasks in the job (40)")
        parser.add_argument("--batch", type=int, default=10, help="tasks per batch (10)")
        parser.add_argument(
            "--local",
            action="store_true",
            help="start a private Redis and local workers instead of using REDIS_URL's",
        )

    def handle(self, *args: Any, items: int, batch: int, local: bool, **options: Any) -> None:
        if items < 1 or batch < 1:
            raise CommandError("--items and --batch must be at least 1")
        try:
            if local:
                with local_cluster(app=celery_app):
                    self.run_job(items, batch)
            else:
                self.run_job(items, batch)
        except KeyboardInterrupt:  # Ctrl-C: one line, as any command-line tool
            raise CommandError("interrupted: the job's stream is deleted") from None

    def run_job(self, items: int, batch: int) -> None:
        """Start the job, follow its stream to the end, then delete the stream."""
        # The bar draws whole lines itself: Django must not add newlines to them.
        self.stdout.ending = ""
        total = items + math.ceil(items / batch)  # the tasks, and one marker per batch
        failed = 0
        with progress_bar(total, desc="outcomes", file=self.stdout) as bar:
            stream = start_job(items, batch, progress=bar)
            try:
                while True:
                    try:
                        outcome = stream.get()
                    except StreamExhausted:
                        break
                    except Exception as exc:  # a failed task, at its place; the job goes on
                        failed += 1
                        bar.say(f"position {exc.seq}: {type(exc).__name__}: {exc}")
                        continue
                    if "marker" in outcome:
                        bar.say(outcome["marker"])
            finally:
                stream.delete()
        self.stdout.write(f"{items} items, {failed} failed, every outcome in order\n")
