"""The Celery apps of the tests, and the code their worker processes run.

- :mod:`tests.apps.celeryapp`: the tests' own app (``-A tests.apps.celeryapp``);
- :mod:`tests.apps.topologyapp`: the app of workers whose streams live on a
  Redis Cluster or Sentinel;
- :mod:`tests.apps.tasks`: the ordered tasks (named ``tests.apps.tasks.<name>``);
- :mod:`tests.apps.faults`, :mod:`tests.apps.host_tasks`,
  :mod:`tests.apps.lifetime_tasks`: plain functions workers run through
  ``celery_ordered.call``;
- :mod:`tests.apps.held`: a function whose first run waits to be killed,
  for tests that SIGKILL a pool process in the middle of a task.

Task names follow module names: a task moved to another module is another
task to a worker that has the old code.
"""
