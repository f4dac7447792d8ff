"""Settings of the example project: only what its page and streams need.

``REDIS_URL`` (default: redis://127.0.0.1:6379/0) holds the streams and is
the broker unless ``BROKER_URL`` names another.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = ["jobs"]
# The page's "Start a job" button posts the token of its csrftoken cookie
# (in the X-CSRFToken header).
MIDDLEWARE = ["django.middleware.csrf.CsrfViewMiddleware"]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)
CELERY_ORDERED_REDIS_URL = REDIS_URL  # where the streams live
CELERY_ORDERED_STREAM_TTL = 3600  # a job's stream is gone an hour after its last use
