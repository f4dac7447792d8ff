"""Stream names and the Redis keys that hold a stream's state.

Every key of one stream shares the hash tag ``{NAME}``, so a Redis Cluster
keeps them in one slot and the scripts in :mod:`celery_ordered.redis.protocol` may
touch them together. Nothing outside :mod:`celery_ordered.redis.protocol` builds a
key by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Prefix of every key celery-ordered writes.
KEY_PREFIX = "co"

#: Longest accepted stream name.
MAX_NAME_LENGTH = 200

_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+=-]+")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a usable stream name, else raise.

    A name is 1 to :data:`MAX_NAME_LENGTH` characters from letters, digits and
    ``_ . : @ + = -``. Braces, whitespace and ``*``/``?`` are refused: they
    would break the hash tag that keeps a stream in one cluster slot, or let a
    name match other streams' keys in a pattern.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"stream name must be a str, got {type(name).__name__}: pass a name "
            "such as 'reports-2026-11' or name=None for a generated one"
        )
    if not name:
        raise ValueError("stream name is empty: pass a name, or name=None for a generated one")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"stream name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_RE.fullmatch(c)})
        raise ValueError(
            f"stream name {name!r} contains {''.join(bad)!r}: use only letters, "
            "digits and _ . : @ + = -"
        )
    return name


@dataclass(frozen=True)
class StreamKeys:
    """The key names of one stream (see the table in docs/how-it-works.md)."""

    name: str

    def _key(self, part: str) -> str:
        return f"{KEY_PREFIX}:{{{self.name}}}:{part}"

    @property
    def seq(self) -> str:
        """Next sequence number to claim."""
        return self._key("seq")

    @property
    def next(self) -> str:
        """Consumer cursor: every number below it has been delivered."""
        return self._key("next")

    @property
    def window(self) -> str:
        """The window cap."""
        return self._key("window")

    @property
    def results(self) -> str:
        """Hash of outcomes by sequence number, for the numbers filled and not yet delivered."""
        return self._key("results")

    @property
    def closed(self) -> str:
        """Number of claims at which the stream was closed."""
        return self._key("closed")

    @property
    def ready(self) -> str:
        """Wake list for a consumer waiting on the head of the stream."""
        return self._key("ready")

    @property
    def space(self) -> str:
        """Wake list for producers waiting on window space."""
        return self._key("space")

    @property
    def done(self) -> str:
        """Wake list for ``join()``: every claimed number is filled."""
        return self._key("done")

    @property
    def pending(self) -> str:
        """Hash of what each unfilled number waits on, until its outcome arrives.

        Field ``<n>`` is its dispatch record, ``t:<n>`` its claim time,
        ``n:<n>`` its re-dispatches, ``h:<n>`` the lease of the worker holding
        it, ``w:<n>`` where it waits in its queue after a re-dispatch, and
        ``b:<n>`` when a backup copy was sent (hedging).
        """
        return self._key("pending")

    @property
    def deadlines(self) -> str:
        """Sorted set of unfilled numbers scored by when reclaim looks at them next (ms).

        A number a worker holds: when its lease lapses; another: when its
        queue may have shown no progress for ``lost_after``.
        """
        return self._key("deadlines")

    @property
    def producers(self) -> str:
        """Hash of each producer's last claim, so a retried claim is not doubled."""
        return self._key("producers")

    @property
    def created(self) -> str:
        """The stream's incarnation: a random id written when the stream is created.

        Every handle learns it when it opens the stream and hands it to the
        scripts that write: a stream deleted (or wiped from Redis) has none,
        and one created again under the same name has another, so a handle
        of the old one is told its stream was deleted instead of writing into
        a stream it does not know.
        """
        return self._key("created")

    @property
    def consumer(self) -> str:
        """Hash of the consumer lease: ``epoch``, ``owner`` and ``until`` (ms).

        Only the consumer holding the current epoch may acknowledge; a
        consumer fenced by a successor (a higher epoch) is refused.
        """
        return self._key("consumer")

    @property
    def error(self) -> str:
        """The producer's error, encoded, when the stream was closed by a failure."""
        return self._key("error")

    @property
    def counters(self) -> str:
        """Hash of counts over the stream's life: ``redispatched`` and ``lost``."""
        return self._key("counters")

    @property
    def lanes(self) -> str:
        """Hash of each lane (a queue and priority) the stream's tasks went to.

        Field ``<lane>`` holds ``"<highest number received>|<last activity ms>"``:
        the highest number of the stream a worker reported receiving from that
        lane, and when the lane last showed progress (a reception, or a
        heartbeat of a worker holding one of its numbers).
        """
        return self._key("lanes")

    @property
    def timing(self) -> str:
        """Hash of recent run times (ms) of a hedged stream's tasks: a ring of samples."""
        return self._key("timing")

    @property
    def adapt(self) -> str:
        """Hash of an adaptive window, present only while the window adapts.

        ``floor`` and ``ceiling`` bound the window; ``why`` says what it
        last did and why (``pop`` grows and shrinks it; see docs/how-it-works.md).
        A window set by the user (``window=``, ``ordered_window``,
        ``set_window``) is fixed: the hash is then absent.
        """
        return self._key("adapt")

    @property
    def mark(self) -> str:
        """Written with every write that waits for replicas (``WAIT``).

        ``WAIT`` counts the replicas that have every earlier write of its
        connection; a write here makes that cover a retried script that had
        nothing new to write (its first try's writes came before).
        """
        return self._key("mark")

    def all(self) -> tuple[str, ...]:
        """Every key of the stream."""
        return (
            self.seq,
            self.next,
            self.window,
            self.results,
            self.closed,
            self.ready,
            self.space,
            self.done,
            self.pending,
            self.deadlines,
            self.producers,
            self.created,
            self.consumer,
            self.error,
            self.counters,
            self.lanes,
            self.timing,
            self.adapt,
            self.mark,
        )


def name_from_key(key: str | bytes) -> str | None:
    """The stream name inside one of its keys, or None for a foreign key."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    prefix = f"{KEY_PREFIX}:{{"
    if not key.startswith(prefix):
        return None
    end = key.rfind("}:")
    return key[len(prefix) : end] if end > len(prefix) else None
