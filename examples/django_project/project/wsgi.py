"""WSGI entry point (``gunicorn --threads 8 project.wsgi``: a stream holds a thread)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_wsgi_application()
