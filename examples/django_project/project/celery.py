"""The project's Celery app, configured from Django settings named ``CELERY_*``.

``CELERY_ORDERED_REDIS_URL`` becomes the app's ``ordered_redis_url``, and so
on for every celery-ordered setting. Start workers from this directory with
``celery -A project worker``.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
