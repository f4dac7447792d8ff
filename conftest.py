# The classic in-process Celery fixtures (celery_app, celery_worker, ...).
# pytest-celery 1.x replaces them with Docker-based ones, so its plugin is
# disabled in pyproject.toml's addopts (-p no:celery) and these load instead.
pytest_plugins = ("celery.contrib.pytest",)
