"""The Celery apps of the tests, and the code their worker processes run.

- :mod:`tests.apps.celeryapp`: the tests' own app (``-A tests.apps.celeryapp``);
- :mod:`tests.apps.topologyapp`: the app of workers whose streams live on a
  Redis Cluster or Sentinel;
- :mod:`tests.apps.tasks`: the ordered tasks (named ``tests.apps.tasks.<name>``);
- :mod:`tests.apps.faults`, :mod:`tests.apps.host_tasks`,
  :mod:`tests.apps.lifetime_tasks`: plain functions workers run through
  ``celery_ordered.call``.

Task names follow module names: a task moved to another module is another
task to a worker that has the old code.
"""
