"""Liveness: worker leases, lost-work detection, stall diagnosis and hedging.

An ordered stream turns one missing outcome into a stall of everything behind
it, so it must tell apart work that is merely slow from work that will never
finish. This module holds both sides of that:

The worker side (a worker's main process, whatever its pool):
:class:`Heartbeat` renews, every third of ``ordered_worker_lease``, a lease
on each stream number the worker holds (received, reserved or running), with
one script call per stream (``lease.lua``); numbers it stopped holding without
an outcome (a pool process killed, the message given back to the broker) are
released in the same call. It is started by Celery's ``worker_ready`` signal
(or, in a worker started without it, by the first stream task the worker
receives) and stopped by ``worker_shutdown``, for any app that imports
celery_ordered;
it reads what the worker holds from Celery's own bookkeeping
(``celery.worker.state``), so a task blocked in C code or in ``sleep`` is held
all the same. The ``celery_ordered_check`` remote-control command tells a consumer
which queues a worker consumes and whether its Redis holds a given stream.
:func:`note_runtime` batches the run times of a hedging stream's tasks.

The consumer side: :class:`Watcher` is called each time a consumer's wait
slice passes without its head-of-line number (the consumer's ``on_wait``
hook): it lets the producer part reclaim lost work, sends a backup of a
straggling head when the stream hedges, and after ``ordered_stall_warning``
seconds on the same number logs one warning that says why the stream waits
(:func:`describe`, :func:`likely_cause`).

Each dispatch record starts with its *lane* (:func:`lane_token`): the queue
and priority the task was routed to, so that Redis can tell which numbers
should have overtaken which (queues are first in, first out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from celery.app.routes import MapRoute

from .config import (
    redis_client,
    resolve_redis,
    stream_ttl,
    worker_lease,
)
from .errors import OrderedStreamError, StreamDeleted
from .redis.keys import StreamKeys
from .redis.protocol import Protocol, RawStats
from .redis.urls import mask_url

logger = logging.getLogger(__name__)

# The stream's logger: users configure the stream's messages by this name.
stream_logger = logging.getLogger("celery_ordered.stream")

#: Shortest time between two heartbeats of one worker: a burst of received
#: tasks is reported in one beat per stream, not one call per task.
MIN_BEAT_GAP = 1.0

#: Fewest run times noted before a hedging stream trusts its typical run time.
HEDGE_SAMPLES = 8

#: Shortest wait slice of a hedging consumer (s), and its slice while the
#: stream's typical run time is not known yet.
HEDGE_MIN_SLICE = 0.002
HEDGE_UNKNOWN_SLICE = 0.02

#: A worker process sends a hedging stream's run times once it has this many...
RUNTIME_BATCH = 8
#: ...or its oldest unsent one is this many seconds old (checked as tasks end).
RUNTIME_FLUSH = 0.5
#: Its first run times for a stream go out at once, until this many were sent.
RUNTIME_EAGER = HEDGE_SAMPLES

#: The remote-control command a consumer asks workers with (see :func:`likely_cause`).
CHECK_COMMAND = "celery_ordered_check"

#: Seconds a consumer waits for workers to answer :data:`CHECK_COMMAND`.
CHECK_TIMEOUT = 1.0


# -- lanes ------------------------------------------------------------------------


#: Lanes already routed, per app: see :func:`lane_of`.
_lanes: weakref.WeakKeyDictionary[Celery, dict[tuple[str, str], str]] = weakref.WeakKeyDictionary()

#: Most lanes remembered per app (the cache is emptied when it is full).
_LANES_KEPT = 512


def lane_of(app: Celery, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> str:
    """The lane a task goes to: its queue's name, and ``@priority`` when it has one.

    Celery's own router decides the queue (``options``, then ``task_routes``,
    then the default queue), as ``apply_async`` will. A route that cannot be
    computed here gives the queue named in ``options``, or "".

    When every route of the app is a mapping (no router function, which
    could look at the arguments), the lane depends only on the task's name
    and options: it is remembered, so a map of many items routes once.
    """
    router = app.amqp.router
    if all(isinstance(route, MapRoute) for route in router.routes):
        key = (name, repr(sorted(options.items())))
        known = _lanes.setdefault(app, {})
        lane = known.get(key)
        if lane is None:
            lane = _route(app, name, args, kwargs, options)
            if len(known) >= _LANES_KEPT:
                known.clear()
            known[key] = lane
        return lane
    return _route(app, name, args, kwargs, options)


def _route(app: Celery, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> str:
    task = app.tasks.get(name)
    priority = options.get("priority", getattr(task, "priority", None))
    try:
        route = app.amqp.router.route(dict(options), name, args, kwargs)
    except Exception:  # the send itself will say what is wrong with the route
        route = {"queue": options.get("queue")}
    queue = route.get("queue")
    queue_name = str(getattr(queue, "name", queue) or "")
    priority = route.get("priority", priority)
    if priority is None:
        priority = app.conf.task_default_priority
    return queue_name if priority is None else f"{queue_name}@{priority}"


def lane_token(lane: str) -> bytes:
    """``lane`` as the first field of a dispatch record: no ``:`` or ``|`` in it."""
    return b"q" + urllib.parse.quote(lane, safe="@").encode()


def lane_name(token: str) -> str:
    """The lane a :func:`lane_token` names ("" for a record that names none)."""
    return urllib.parse.unquote(token[1:]) if token.startswith("q") else ""


def queue_of(lane: str) -> str:
    """The queue of a lane (its name without ``@priority``)."""
    return lane.rsplit("@", 1)[0] if "@" in lane else lane


def lane_of_record(record: bytes) -> str:
    """The lane token a dispatch record starts with (what :func:`lane_token` made)."""
    return record[: record.index(b":")].decode()


def record_body(record: bytes) -> bytes:
    """A dispatch record with its lane replaced by ``0``, as :func:`codec.decode` reads it."""
    return b"0" + record[record.index(b":") :]


# -- the worker side: heartbeats ----------------------------------------------------


def _stream_of(request: Any) -> tuple[tuple[str, str], int, str] | None:
    """``((stream, incarnation), number, lane)`` of a worker's request; None if not a stream's."""
    from .task import HEADER_INCARNATION, HEADER_LANE, HEADER_SEQ, HEADER_STREAM

    headers = getattr(request, "request_dict", None)
    if not isinstance(headers, dict):
        headers = getattr(getattr(request, "message", None), "headers", None) or {}
    stream = headers.get(HEADER_STREAM)
    if stream is None:
        return None
    try:
        seq = int(headers[HEADER_SEQ])
    except (KeyError, TypeError, ValueError):
        return None
    lane = str(headers.get(HEADER_LANE) or "").replace(" ", "%20")
    return (str(stream), str(headers.get(HEADER_INCARNATION) or "")), seq, lane


#: What a heartbeat reports of one number: ``(number, state, seconds since
#: received, seconds since started or None, lane)``; the state ``"received"``
#: or ``"started"`` (held), or ``"gone"`` (received since the last beat, and
#: held no more: it finished).
Entry = tuple[int, str, float, float | None, str]


class Heartbeat:
    """Keeps a lease alive on each stream number one worker holds (its main process).

    Every ``interval`` seconds (a third of ``ordered_worker_lease``), and at
    most :data:`MIN_BEAT_GAP` seconds after it received a stream's task, it
    reads what the worker holds from ``celery.worker.state`` (received,
    reserved and running requests) and makes one ``lease.lua`` call per
    stream: a lease of ``ordered_worker_lease`` seconds on each number held,
    and a release of each number held at the previous beat that is held no
    more. It never stops a beat over a stream that fails: each is tried
    again at the next one.
    """

    def __init__(self, app: Celery, hostname: str, consumer: Any = None) -> None:
        self.app = app
        #: The worker's consumer (which holds the rate-limit buckets), when known.
        self.consumer = consumer
        self.holder = f"{hostname} {os.getpid()}".replace("|", "/")
        self.lease = worker_lease(app)
        self.interval = self.lease / 3
        self._gap = min(MIN_BEAT_GAP, self.interval)
        self._ttl = stream_ttl(app)
        self._nudged = threading.Event()
        self._stopped = threading.Event()
        self._received: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        # What each stream (name, incarnation) had held at the last beat that reached it.
        self._held: dict[tuple[str, str], set[int]] = {}
        # Numbers received since the last beat that reached their stream, with
        # their lanes: a task may be done before the next beat, and its
        # reception still tells that its queue moves.
        self._recent: dict[tuple[str, str], dict[int, str]] = {}
        self._lock = threading.Lock()
        self._failing: set[tuple[str, str]] = set()
        self._last = 0.0
        self._thread = threading.Thread(
            target=self._run, name=f"celery-ordered-heartbeat {hostname}", daemon=True
        )

    def start(self) -> None:
        """Start beating in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Beat one last time (releasing what is held no more), then stop."""
        self._stopped.set()
        self._nudged.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)

    def received(self, request: Any) -> None:
        """The worker received ``request``: note when, and report it soon."""
        found = _stream_of(request)
        if found is None:
            return
        key, seq, lane = found
        with self._lock:
            self._recent.setdefault(key, {})[seq] = lane
        with contextlib.suppress(TypeError):  # a request that takes no weak reference
            self._received[request] = time.time()
        self._nudged.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._nudged.wait(self.interval)
            if self._stopped.is_set():
                break
            # A burst of receptions becomes one beat: wait out the shortest gap.
            self._stopped.wait(max(0.0, self._last + self._gap - time.monotonic()))
            self._nudged.clear()
            self._beat_safely()
        self._beat_safely()

    def _beat_safely(self) -> None:
        try:
            self.beat()
        except Exception:  # the heartbeat must outlive anything one beat meets
            logger.exception("celery-ordered heartbeat failed; next beat in %gs", self.interval)

    def holding(self) -> dict[tuple[str, str], list[Entry]] | None:
        """What the worker holds now, by stream (see :data:`Entry`).

        From ``celery.worker.state``, which the worker's main process keeps
        for every pool.
        """
        from celery.worker import state

        requests: list[Any] = []
        for _ in range(5):  # the worker's own thread changes the sets as we read them
            try:
                requests = [
                    *state.reserved_requests,
                    *state.active_requests,
                    *self._waiting_to_start(),
                ]
                break
            except RuntimeError:
                continue
        else:
            # Not "holds nothing": that would give back every number it holds.
            return None
        now = time.time()
        held: dict[tuple[str, str], dict[int, Entry]] = {}
        for request in requests:
            found = _stream_of(request)
            if found is None:
                continue
            key, seq, lane = found
            try:
                received = self._received.setdefault(request, now)
            except TypeError:
                received = now
            started = getattr(request, "time_start", None)
            entry = (
                seq,
                "received" if started is None else "started",
                max(0.0, now - received),
                None if started is None else max(0.0, now - started),
                lane,
            )
            # One number held twice (a redelivery beside the original): started wins.
            known = held.setdefault(key, {}).get(seq)
            if known is None or known[1] == "received":
                held[key][seq] = entry
        return {key: list(numbers.values()) for key, numbers in held.items()}

    def _waiting_to_start(self) -> list[Any]:
        """Requests the worker holds outside ``reserved_requests``: not due yet.

        A task with an eta or countdown waits in the worker's timer
        (``celery.worker.state.scheduled_requests``, or the timer's own
        entries on a Celery without that set), and a rate-limited one in its
        task's token bucket, until it is due; its message is the worker's all
        the while, so its number must be leased all the while.
        """
        from celery.worker import state

        found: list[Any] = list(getattr(state, "scheduled_requests", ()))
        consumer = self.consumer
        if consumer is None:
            return found
        if not hasattr(state, "scheduled_requests"):  # an older Celery
            timer = getattr(consumer, "timer", None)
            for item in list(getattr(timer, "queue", None) or ()):
                args = getattr(item[-1], "args", None) if isinstance(item, tuple) else None
                if args:
                    found.append(args[0])
        buckets = getattr(consumer, "task_buckets", None) or {}
        for bucket in list(buckets.values()):
            for item in list(getattr(bucket, "contents", None) or ()):
                found.append(item[0] if isinstance(item, tuple) else item)
        return found

    def beat(self) -> None:
        """Renew the leases this worker holds, release what it gave back: a call per stream."""
        self._last = time.monotonic()
        holding = self.holding()
        if holding is None:
            logger.warning(
                "celery-ordered heartbeat: the worker's state changed under every read; "
                "this beat is skipped, the next one renews the leases"
            )
            return
        with self._lock:
            recent, self._recent = self._recent, {}
        if not holding and not self._held and not recent:
            return
        try:
            client = redis_client(self.app)
        except Exception as exc:
            logger.warning("celery-ordered heartbeat: no Redis to renew leases in: %s", exc)
            return
        for key in set(holding) | set(self._held) | set(recent):
            name, incarnation = key
            held = holding.get(key, [])
            numbers = {entry[0] for entry in held}
            gone: list[Entry] = [
                (seq, "gone", 0.0, None, lane)
                for seq, lane in recent.get(key, {}).items()
                if seq not in numbers
            ]
            released = sorted(self._held.get(key, set()) - numbers)
            try:
                Protocol(client, name, ttl=self._ttl).beat(
                    incarnation, self.holder, self.lease, held + gone, released
                )
            except StreamDeleted:
                # Deleted, or not in this Redis (the producer uses another one):
                # nothing to renew; the task's own publish says so.
                self._held.pop(key, None)
                self._failing.discard(key)
                continue
            except Exception as exc:
                with self._lock:  # its receptions go with the next beat
                    for seq, lane in recent.get(key, {}).items():
                        self._recent.setdefault(key, {}).setdefault(seq, lane)
                if key not in self._failing:
                    self._failing.add(key)
                    logger.warning(
                        "celery-ordered heartbeat for stream %s failed (tried again every "
                        "%gs; its tasks are dispatched again elsewhere once their lease of "
                        "%gs lapses): %r", name, self.interval, self.lease, exc,
                    )  # fmt: skip
                continue
            self._failing.discard(key)
            if held:
                self._held[key] = {entry[0] for entry in held}
            else:
                self._held.pop(key, None)


_heartbeats: dict[int, Heartbeat] = {}
_heartbeats_lock = threading.Lock()
# Apps whose settings refused a heartbeat (said once, not at every task).
_refused: set[int] = set()


@signals.worker_ready.connect(weak=False)
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """A worker is ready: start its heartbeat, and answer :data:`CHECK_COMMAND`."""
    _ensure_heartbeat(sender, restart=True)


def _ensure_heartbeat(consumer: Any, *, restart: bool) -> Heartbeat | None:
    """The heartbeat of the worker whose consumer is ``consumer``, started if need be.

    ``worker_ready`` starts it (``restart``: a new one replaces a heartbeat
    another worker of the same app left behind). A worker started without
    that signal (a ``WorkController`` made directly, as
    ``celery.contrib.testing`` and pytest-celery do) starts it as it receives
    its first stream task: its numbers must be leased all the same, or a
    worker of the same queue that beats would have them sent again.
    """
    app = getattr(consumer, "app", None)
    if app is None:
        return None

    def current() -> Heartbeat | None:
        found = _heartbeats.get(id(app))
        if found is not None and (found.consumer is consumer or not restart):
            return found
        return None

    found = current()
    if found is not None or (not restart and id(app) in _refused):
        return found
    _register_check_command()
    try:
        heartbeat = Heartbeat(app, str(getattr(consumer, "hostname", None) or "worker"), consumer)
    except OrderedStreamError as exc:  # a bad setting: say so (once), and let the worker run
        if id(app) not in _refused:
            _refused.add(id(app))
            logger.error("celery-ordered heartbeat not started: %s", exc)
        return None
    with _heartbeats_lock:
        found = current()
        if found is not None:
            return found  # another thread started it meanwhile
        old = _heartbeats.get(id(app))
        _heartbeats[id(app)] = heartbeat
    if old is not None:
        old.stop()
    heartbeat.start()
    return heartbeat


@signals.task_received.connect(weak=False)
def _task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None or _stream_of(request) is None:
        return
    heartbeat = _ensure_heartbeat(sender, restart=False)
    if heartbeat is not None:
        heartbeat.received(request)


@signals.worker_shutdown.connect(weak=False)
def _stop_heartbeat(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    with _heartbeats_lock:
        heartbeat = _heartbeats.pop(id(app), None) if app is not None else None
    if heartbeat is not None:
        heartbeat.stop()


def _check(state: Any, stream: str = "", incarnation: str = "") -> dict[str, Any]:
    """The queues this worker consumes, its Redis (masked), and whether it holds ``stream``."""
    consumer = getattr(state, "consumer", None)
    app = getattr(consumer, "app", None) or getattr(state, "app", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = [str(q.name) for q in getattr(task_consumer, "queues", None) or []]
    answer: dict[str, Any] = {"queues": queues, "redis": None, "has_stream": None}
    try:
        answer["redis"] = mask_url(resolve_redis(app)[0])
        found = redis_client(app, fail_fast=True).get(StreamKeys(stream).created)
        answer["has_stream"] = Protocol._text(found) == incarnation if found else False
    except Exception as exc:
        answer["error"] = mask_url(repr(exc))
    return answer


_registered = False


def _register_check_command() -> None:
    """Teach this worker :data:`CHECK_COMMAND` (once per process)."""
    global _registered
    if _registered:
        return
    from celery.worker.control import inspect_command

    inspect_command(
        name=CHECK_COMMAND,
        args=[("stream", str), ("incarnation", str)],
        signature="<stream> <incarnation>",
    )(_check)
    _registered = True


# -- the worker side: run times of hedging streams ------------------------------------


class _Runtimes:
    """Run times a worker process has not sent yet, per stream (a hedging stream's only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[tuple[str, str], list[float]] = {}
        self.oldest: dict[tuple[str, str], float] = {}
        self.sent: dict[tuple[str, str], int] = {}


_runtimes = _Runtimes()


def note_runtime(app: Celery, stream: str, incarnation: str, seconds: float) -> None:
    """Note one run time of a hedging stream's task; send a batch when one is due.

    Sent in one call per :data:`RUNTIME_BATCH` tasks or :data:`RUNTIME_FLUSH`
    seconds (the first :data:`RUNTIME_EAGER` at once), so a hedging stream
    costs its workers a fraction of a round trip per task. Never raises.
    """
    key = (stream, incarnation)
    now = time.monotonic()
    with _runtimes.lock:
        waiting = _runtimes.waiting.setdefault(key, [])
        waiting.append(seconds)
        oldest = _runtimes.oldest.setdefault(key, now)
        due = (
            len(waiting) >= RUNTIME_BATCH
            or now - oldest >= RUNTIME_FLUSH
            or _runtimes.sent.get(key, 0) < RUNTIME_EAGER
        )
        if not due:
            return
        batch = _runtimes.waiting.pop(key)
        _runtimes.oldest.pop(key, None)
        _runtimes.sent[key] = _runtimes.sent.get(key, 0) + len(batch)
        if len(_runtimes.sent) > 1000:  # forget long-gone streams
            _runtimes.sent.clear()
        if len(_runtimes.waiting) > 1000:
            # Samples of streams that ran no task since (done, deleted) would
            # wait for a next one for ever, in a worker that runs for months.
            stale = [k for k, since in _runtimes.oldest.items() if now - since > RUNTIME_FLUSH]
            for gone in stale:
                _runtimes.oldest.pop(gone, None)
                _runtimes.waiting.pop(gone, None)
    try:
        Protocol(redis_client(app), stream, ttl=stream_ttl(app)).note_runtimes(incarnation, batch)
    except Exception as exc:  # a lost sample only makes hedging wait for more
        logger.debug("could not note run times of stream %s: %r", stream, exc)


# -- the consumer side: what the head of the line waits on -----------------------------


@dataclass(frozen=True)
class Blocker:
    """What the head-of-line number of a stream waits on (see :func:`describe`)."""

    #: The number.
    seq: int
    #: "started" or "received" (a live worker holds it), "lapsed" (its worker
    #: stopped renewing its lease), "queued" (no worker holds it), or "marker"
    #: (a marker its producer has not published).
    state: str
    #: The queue it was sent to (with ``@priority``), if known.
    queue: str | None
    #: The worker holding it (or that held it): its node name and pid.
    worker: str | None
    #: Seconds since it started, since its worker received it, and since its
    #: worker's last heartbeat (None when unknown).
    started_ago: float | None
    received_ago: float | None
    heartbeat_ago: float | None
    #: How many times it was dispatched (1 + re-dispatches).
    dispatches: int
    #: Seconds until it is dispatched again (or given up as lost): 0 at the
    #: next reclaim; None while a live worker holds it.
    next_dispatch: float | None
    #: Whether a backup copy was sent (hedging).
    hedged: bool
    #: All of it as one sentence.
    text: str


def _ago(now_ms: int, then_ms: int) -> float:
    return max(0.0, (now_ms - then_ms) / 1000)


def _seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.0f} min"
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def describe(
    raw: RawStats,
    *,
    lost_after: float,
    overtaken_after: float,
    max_redispatches: int,
) -> Blocker | None:
    """What the blocker of the snapshot ``raw`` waits on, and when it is sent again.

    ``lost_after``, ``overtaken_after`` and ``max_redispatches`` are those of
    the handle asking (a consumer reclaims with its own). None when nothing
    blocks the stream.
    """
    seq = raw.next + raw.contiguous
    if seq >= raw.claimed or not raw.head_status:
        return None
    now = raw.now_ms
    dispatches = 1 + raw.head_redispatched
    hedged = bool(raw.head_backup)
    last = raw.head_redispatched >= max_redispatches
    again = "given up as lost (ResultLost)" if last else "dispatched again"
    lane = lane_name(raw.head_lane)
    backup = "; a backup copy was sent (hedging)" if hedged else ""
    if raw.head_lease:
        until, _, received, started, beat, holder = raw.head_lease.split("|", 5)
        received_ago = _ago(now, int(received))
        started_ago = None if int(started) < 0 else _ago(now, int(started))
        beat_ago = _ago(now, int(beat))
        if int(until) > now:
            what = (
                f"started {_seconds(started_ago)} ago"
                if started_ago is not None
                else f"received {_seconds(received_ago)} ago and not started yet (the worker "
                "is busy with the tasks before it, or it waits for its eta)"
            )
            text = (
                f"number {seq} is held by worker {holder}: {what}; the worker renewed its "
                f"lease {_seconds(beat_ago)} ago, so it is not dispatched again while it "
                f"holds it (unless renewed, the lease lapses in "
                f"{_seconds(_ago(int(until), now))}){backup}"
            )
            return Blocker(
                seq, "started" if started_ago is not None else "received", lane or None,
                holder, started_ago, received_ago, beat_ago, dispatches, None, hedged, text,
            )  # fmt: skip
        text = (
            f"number {seq} was held by worker {holder}, which stopped renewing its lease "
            f"{_seconds(_ago(now, int(until)))} ago (it died, froze or lost its network): "
            f"it is {again} at the next reclaim{backup}"
        )
        return Blocker(
            seq, "lapsed", lane or None, holder, started_ago, received_ago, beat_ago,
            dispatches, 0.0, hedged, text,
        )  # fmt: skip
    claimed_ms = raw.head_claimed_ms if raw.head_claimed_ms is not None else now
    behind, since, over = seq, claimed_ms, 0
    if raw.head_waits:
        behind, since, over = (int(part) for part in raw.head_waits.split("|"))
    idle_in = max(0.0, (since + lost_after * 1000 - now) / 1000)
    if raw.head_status == "M":
        text = (
            f"number {seq} is a marker its producer claimed {_seconds(_ago(now, claimed_ms))} "
            f"ago and has not published (did the producer die?): it is published from its "
            f"record in {_seconds(idle_in)}"
        )
        return Blocker(seq, "marker", None, None, None, None, None, 1, idle_in, False, text)
    high, active = -1, 0
    if raw.head_lane_progress:
        high_text, active_text = raw.head_lane_progress.split("|")
        high, active = int(high_text), int(active_text)
    where = f"queue {lane!r}" if lane else "its queue"
    waited = (
        f"since its re-dispatch {_seconds(_ago(now, since))} ago"
        if raw.head_waits
        else f"in the {_seconds(_ago(now, since))} since it was sent"
    )
    idle_in = max(0.0, (max(since, active) + lost_after * 1000 - now) / 1000)
    if high > behind:
        progress = (
            f"a worker received number {high}, sent after it to that queue: its own "
            f"message was lost (purged, expired, lost with a broker, or never sent)"
        )
        # Seen overtaken at `over`; not seen yet, the next reclaim does.
        seen = over or now
        overtaken_in = max(0.0, (seen + overtaken_after * 1000 - now) / 1000)
        next_dispatch = min(overtaken_in, idle_in)
    elif active:
        progress = (
            f"the last progress in that queue was {_seconds(_ago(now, active))} ago (no worker "
            f"received a task sent after it)"
        )
        next_dispatch = idle_in
    else:
        progress = "no worker has reported receiving any task of this stream from that queue"
        next_dispatch = idle_in
    text = (
        f"number {seq} is queued on {where} and no worker has received it {waited} "
        f"(dispatched {dispatches} time{'s' if dispatches > 1 else ''}); {progress}; it is "
        f"{again} in {_seconds(next_dispatch)}{backup}"
    )
    return Blocker(
        seq, "queued", lane or None, None, None, None, None, dispatches, next_dispatch, hedged,
        text,
    )  # fmt: skip


def where(client: Any) -> str:
    """The Redis ``client`` talks to, for messages (never its password)."""
    try:
        found = client.get_connection_kwargs()
    except Exception:
        return "this stream's Redis"
    if found.get("path"):
        return f"unix://{found['path']}?db={found.get('db') or 0}"
    return mask_url(f"redis://{found.get('host')}:{found.get('port')}/{found.get('db') or 0}")


def likely_cause(app: Celery, name: str, incarnation: str, queue: str, redis_url: str) -> str:
    """Why no worker takes a queued number, when cheap to tell; "" when nothing is found.

    One broadcast (:data:`CHECK_COMMAND`, waiting :data:`CHECK_TIMEOUT`):
    every worker that answers says which queues it consumes and whether its
    Redis holds this stream. Tells apart: no worker answers; no worker
    consumes the queue; the workers that consume it publish to another Redis.
    """
    try:
        replies = app.control.broadcast(
            CHECK_COMMAND,
            arguments={"stream": name, "incarnation": incarnation},
            reply=True,
            timeout=CHECK_TIMEOUT,
        )
    except Exception as exc:
        return f"the workers could not be asked through the broker: {mask_url(repr(exc))}"
    answers: dict[str, dict[str, Any]] = {}
    for reply in replies or []:
        for node, answer in reply.items():
            answers[node] = answer if isinstance(answer, dict) else {"error": repr(answer)}
    if not answers:
        return (
            f"no worker answered through the broker within {CHECK_TIMEOUT:g}s: are workers "
            "running, connected to this app's broker, and with remote control on "
            "(worker_enable_remote_control)?"
        )
    consumers = {
        node: answer for node, answer in answers.items() if queue in (answer.get("queues") or [])
    }
    if not consumers:
        listed = "; ".join(
            f"{node} consumes {', '.join(answer.get('queues') or []) or 'nothing known'}"
            for node, answer in sorted(answers.items())
        )
        return (
            f"no worker consumes queue {queue!r} ({listed}): start one with -Q {queue}, or "
            "route the task to a queue that has workers"
        )
    elsewhere = {
        node: answer for node, answer in consumers.items() if answer.get("has_stream") is False
    }
    if elsewhere and len(elsewhere) == len(consumers):
        listed = "; ".join(
            f"{node} publishes to {answer.get('redis')}"
            for node, answer in sorted(elsewhere.items())
        )
        return (
            f"the workers that consume queue {queue!r} publish to another Redis, which has no "
            f"stream {name!r} ({listed}); this stream lives in {mask_url(redis_url)}: give the "
            "workers the same ordered_redis_url"
        )
    return ""


class Watcher:
    """What a consumer does each time a wait slice passes without its head-of-line number.

    Lets the producer part reclaim lost work (``reclaim()``, throttled by
    itself), sends a backup copy of a straggling head when the stream hedges
    (``hedge_factor``), and once the consumer has waited ``stall_warning``
    seconds on the same number logs one warning that says why. ``slice()`` is
    the consumer's wait slice: for a hedging stream, until a backup of the
    head comes due, so that it goes out in time.
    """

    def __init__(
        self,
        app: Celery,
        name: str,
        protocol: Protocol,
        *,
        reclaim: Callable[[], None],
        backup: Callable[[int, bytes], None],
        redis_url: Callable[[], str],
        stall_warning: float,
        hedge_factor: float | None,
        lost_after: float,
        overtaken_after: float,
        max_redispatches: int,
        wait_slice: Callable[[], float],
    ) -> None:
        self.app = app
        self.name = name
        self.protocol = protocol
        self.stall_warning = stall_warning
        self.hedge_factor = hedge_factor
        self.lost_after = lost_after
        self.overtaken_after = overtaken_after
        self.max_redispatches = max_redispatches
        self._reclaim = reclaim
        self._backup = backup
        self._redis_url = redis_url
        self._wait_slice = wait_slice
        self._head = -1
        self._since = 0.0
        self._warned = False
        self._last_slice = wait_slice()
        self._backed_up = -1
        #: The typical run time of the stream's tasks (s), once a hedging stream knows it.
        self.typical: float | None = None

    def slice(self) -> float:
        """Seconds a consumer waits for its head before it calls :meth:`on_wait`.

        While a hedging stream waits, it wakes when a backup of the number it
        waits for comes due (a new head's after ``factor`` times the typical
        run time), so it asks Redis about once per straggler, not in a loop.
        """
        chosen = longest = self._wait_slice()
        if self.hedge_factor is not None:
            if self.typical is None:
                due = HEDGE_UNKNOWN_SLICE  # until the run times are in
            else:
                due = self.hedge_factor * self.typical
                if self._head != self._backed_up:
                    due -= time.monotonic() - self._since
            chosen = min(longest, max(HEDGE_MIN_SLICE, due))
        self._last_slice = chosen
        return chosen

    def on_wait(self, head: int) -> None:
        """A wait slice passed without number ``head``: reclaim, hedge, warn."""
        now = time.monotonic()
        if head != self._head:
            # The consumer began waiting for it one slice ago.
            self._head, self._since, self._warned = head, now - self._last_slice, False
        waited = now - self._since
        if self.hedge_factor is not None:
            typical, record = self.protocol.hedge(head, self.hedge_factor, waited, HEDGE_SAMPLES)
            self.typical = typical
            if record:
                stream_logger.info(
                    "stream %r: number %d has run %.3gs, over %g times the typical %.3gs: "
                    "a backup copy is sent (hedge)", self.name, head, waited,
                    self.hedge_factor, typical or 0.0,
                )  # fmt: skip
                self._backed_up = head
                self._backup(head, record)
        self._reclaim()
        if not self._warned and waited >= self.stall_warning:
            self._warned = True
            self.warn(head, waited)

    def warn(self, head: int, waited: float) -> None:
        """Log the one warning for a consumer stalled on ``head`` for ``waited`` seconds."""
        raw = self.protocol.stats()
        blocker = describe(
            raw,
            lost_after=self.lost_after,
            overtaken_after=self.overtaken_after,
            max_redispatches=self.max_redispatches,
        )
        if blocker is None or blocker.seq != head:
            return  # it arrived meanwhile
        cause = ""
        if blocker.state == "queued" and blocker.queue is not None:
            cause = likely_cause(
                self.app, self.name, raw.incarnation, queue_of(blocker.queue), self._redis_url()
            )
        stream_logger.warning(
            "stream %r has waited %s for number %d: %s%s",
            self.name,
            _seconds(waited),
            head,
            blocker.text,
            f". Likely cause: {cause}" if cause else "",
        )
