"""``python -m celery_ordered``: the same as the ``celery-ordered`` command."""

from .cli import main

main(prog_name="celery-ordered")
