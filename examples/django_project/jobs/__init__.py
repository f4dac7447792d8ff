"""An app that runs ordered jobs on Celery and streams their outcomes."""
