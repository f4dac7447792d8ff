"""Benchmarks of celery-ordered against plain Celery and multiprocessing (see README.md)."""
