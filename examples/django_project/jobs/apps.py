"""The jobs app."""

from django.apps import AppConfig


class JobsConfig(AppConfig):
    """Runs ordered jobs on Celery."""

    name = "jobs"
