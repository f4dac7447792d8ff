"""What a test run must not leave behind, checked when it ends (see tests/conftest.py).

At the start of a run :class:`Leftovers` notes the keys of the tests' Redis
database and our kinds of temporary files already there. At the end it
deletes the keys kombu made for the run's queues (binding sets, queue lists,
``unacked`` bookkeeping: none of them has a TTL, and no worker of the run is
left to use them), then reports every new key without a TTL and every new
temporary file or directory of ours.

Keys and files that appeared during the run are taken as the run's own: a
second test run working on the same database at the same time would have its
kombu keys deleted (its queues re-declare them when its workers restart) and
could be blamed for its files. CI runs one at a time.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Iterable

import redis

#: Our kinds of temporary files and directories (in the temporary directory);
#: ``{session}`` is the run's own mark, so another run's are not blamed.
TEMP_PATTERNS = (
    "co-worker-{session}-*",
    "co-docs-*",
    "co-cluster-*",
    "co-sentinel-*",
    "celery-ordered-*",
    "pymp-*",
)

#: kombu's keys that are not named after a queue.
KOMBU_SHARED = (b"unacked", b"unacked_index", b"unacked_mutex", b"_kombu.binding_deadlines")

#: kombu's separator and priority steps in queue key names (``QUEUE\x06\x163``).
KOMBU_SEP = b"\x06\x16"
KOMBU_PRIORITIES = (3, 6, 9)


class Leftovers:
    """The state of the tests' Redis and temporary directory when a run began."""

    def __init__(self, redis_url: str, session: str) -> None:
        self.session = session
        self.client = redis.Redis.from_url(redis_url)
        self.began = time.time()
        self.keys_before = self._keys()
        self.paths_before = self._paths()

    def _keys(self) -> set[bytes]:
        try:
            return set(self.client.scan_iter(count=1000))
        except redis.RedisError:
            return set()

    def _paths(self) -> set[str]:
        tmp = tempfile.gettempdir()
        patterns = [pattern.format(session=self.session) for pattern in TEMP_PATTERNS]
        return {path for pattern in patterns for path in glob.glob(os.path.join(tmp, pattern))}

    def delete_kombu_keys(self, keys: Iterable[bytes]) -> None:
        """Delete kombu's bindings and queues among ``keys`` (new in this run)."""
        queues: set[bytes] = set()
        doomed: list[bytes] = []
        for key in keys:
            if key.startswith(b"_kombu.binding"):
                if key.startswith((b"_kombu.binding.", b"_kombu.binding_permanent.")):
                    for member in self.client.smembers(key):
                        queues.add(member.split(KOMBU_SEP)[-1])
                doomed.append(key)
            elif key in KOMBU_SHARED:
                doomed.append(key)
        for queue in queues:
            doomed.append(queue)
            doomed.extend(queue + KOMBU_SEP + str(p).encode() for p in KOMBU_PRIORITIES)
        if doomed:
            self.client.delete(*doomed)

    def clean_and_check(self) -> list[str]:
        """Delete the run's kombu keys; describe whatever else of ours is left."""
        problems: list[str] = []
        try:
            new = self._keys() - self.keys_before
            self.delete_kombu_keys(new)
            for key in sorted(self._keys() - self.keys_before):
                if self.client.pttl(key) == -1:
                    problems.append(f"Redis key without a TTL: {key.decode(errors='replace')}")
        except redis.RedisError as exc:
            problems.append(f"the tests' Redis could not be checked: {exc}")
        finally:
            self.client.close()
        for path in sorted(self._paths() - self.paths_before):
            try:
                made = os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if made >= self.began - 1 and not _in_use(path):
                problems.append(f"temporary file or directory left: {path}")
        return problems


def _in_use(path: str) -> bool:
    """Whether a running process names ``path`` (a live private Redis's keeper)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if path.encode() in handle.read():
                    return True
        except OSError:
            continue
    return False
