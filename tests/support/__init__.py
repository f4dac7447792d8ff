"""What the tests use but do not test: one module per job, none of them a test.

- :mod:`tests.support.workers`: the one launcher of ``celery worker``
  subprocesses, and its readiness checks;
- :mod:`tests.support.topologies`: local servers beyond the tests' Redis (a
  Redis Cluster, a primary with replicas under Sentinel, RabbitMQ);
- :mod:`tests.support.netns`: separate hosts in Linux network namespaces;
- :mod:`tests.support.browsers`: the web examples' pages in headless Chromium;
- :mod:`tests.support.django_project`: the Django example project, set up;
- :mod:`tests.support.processes`: ``/proc`` helpers, private clusters'
  footprints and owners;
- :mod:`tests.support.leftovers`: what a run must not leave behind;
- :mod:`tests.support.redis_faults`: Redis killed with SIGKILL and restarted
  on its data, and replies cut between Redis and its client;
- :mod:`tests.support.waiting`: :func:`~tests.support.waiting.wait_until`;
- :mod:`tests.support.tools`: :func:`~tests.support.tools.require_tool`, the
  one check for programs and servers a test needs;
- :mod:`tests.support.cli`: the ``celery ordered`` command of the tests' app.

The Celery apps and the code workers run are in :mod:`tests.apps`; fixtures
are in ``tests/conftest.py``. The benchmarks may use
:mod:`~tests.support.workers` and :mod:`~tests.support.topologies` too.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

#: The repository's root directory.
ROOT = Path(__file__).resolve().parent.parent.parent

#: This run's own mark, in the names of the temporary files it makes
#: (inherited by every process it starts).
SESSION = os.environ.setdefault("CO_TEST_SESSION", uuid.uuid4().hex[:8])
