"""Web framework integrations: stream a job's outcomes as an HTTP response.

- :mod:`celery_ordered.contrib.flask`: ``stream_response(stream)`` returns a
  ``flask.Response`` (``pip install 'celery-ordered[flask]'``).
- :mod:`celery_ordered.contrib.django`: ``stream_response(request, stream)``
  returns a ``StreamingHttpResponse``, under WSGI and ASGI
  (``pip install 'celery-ordered[django]'``).
- :mod:`celery_ordered.contrib.fastapi`: ``stream_response(request, source)``
  returns a Starlette ``StreamingResponse``, read on the event loop from an
  asyncio stream (``pip install 'celery-ordered[fastapi]'``).

All are thin: the formats live in :mod:`celery_ordered.web`.
"""
