"""ParallelQueue and ParallelSingleTaskQueue keep the promises of parallel_queue's README.

Every test runs real worker processes: by default each queue starts its own
private Redis and local Celery workers; ``test_*_on_a_celery_fleet`` use the
tests' Celery worker instead. Finishing orders are forced with
``multiprocessing.Event`` objects the workers inherit, never with sleeps.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Empty, Full
from typing import Any

import pytest
from celery import signals

from celery_ordered import ParallelQueue, ParallelSingleTaskQueue, StreamExhausted
from celery_ordered.compat import window_for
from tests.support.processes import Owner, descendants, footprint
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leftovers")

#: Seconds any single result may take to arrive (a bound, not a pace).
RESULT_TIMEOUT = 30.0

#: Seconds a task waits for the test to release it before giving up.
EVENT_TIMEOUT = 60.0


# -- what the tests put --------------------------------------------------------


class BatchDone(int):
    """The README's marker for the completion of an indexing batch."""


@dataclass(frozen=True)
class Point:
    """A class of the tests' own that only pickle can carry."""

    x: int
    y: int


class Refused(Exception):
    """An exception of the tests' own, with attributes beyond its args."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def square(x: int) -> int:
    return x * x


def uneven_square(x: int, seconds: float) -> int:
    time.sleep(seconds)  # uneven work: later tasks often finish first
    return x * x


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def refuse(code: int) -> None:
    raise Refused(code, "not today")


def make_point(x: int, y: int) -> Point:
    return Point(x, y)


def shift(point: Point, dx: int) -> Point:
    return Point(point.x + dx, point.y)


def arguments_of(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def current_pid() -> int:
    return os.getpid()


#: Set by worker_init_f in each worker process (see test_worker_init_f_*).
WORKER_STATE: dict[str, int] = {}


def initialised_here() -> bool:
    return WORKER_STATE.get("initialised_in") == os.getpid()


def make_greeter(greeting: str) -> Any:
    def greet(name: str) -> str:
        return f"{greeting}, {name}"

    return greet


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_queue() -> Iterator[ParallelQueue]:
    """One queue for the tests that leave it as they found it: nothing in flight."""
    queue = ParallelQueue(num_workers=2, daemon=True)
    fp = footprint(queue._cluster)
    yield queue
    queue.stop()
    queue.join(timeout=RESULT_TIMEOUT)
    assert not queue.is_alive()
    fp.wait_gone()


def take(queue: ParallelQueue, count: int) -> list[Any]:
    return [queue.get(timeout=RESULT_TIMEOUT) for _ in range(count)]


# -- ordering ------------------------------------------------------------------


def test_results_come_back_in_put_order_although_later_tasks_finish_first(shared_queue):
    # Earlier tasks work longest, so results arrive at the consumer reversed.
    for i in range(12):
        shared_queue.put(uneven_square, i, (12 - i) * 0.005)

    assert take(shared_queue, 12) == [i * i for i in range(12)]


#: Every finishing order of four tasks: one round of the permutation test each.
ORDERS = list(itertools.permutations(range(4)))


class PermutationTask:
    """The README's PermutationTask: a task holding events, shared by inheritance.

    Task ``(round, slot)`` waits until the test sets its ``go`` event; a
    ``task_success`` handler sets its ``published`` event once the worker has
    put the result into the stream. So the test, not the scheduler, decides in
    which order results reach Redis. Each round has events of its own, never
    cleared: a run of a task from an earlier round, whenever it comes, finds
    its round's events as that round left them and touches no other round's.
    ``runs`` counts the runs of each task, so that a test can say how many
    times one ran.
    """

    MARK = "permutation"

    def __init__(self, slots: int, rounds: list[str]) -> None:
        self.rounds = {round_: i for i, round_ in enumerate(rounds)}
        self.go = [[multiprocessing.Event() for _ in range(slots)] for _ in rounds]
        self.published = [[multiprocessing.Event() for _ in range(slots)] for _ in rounds]
        self.runs = multiprocessing.Array("i", len(rounds) * slots)
        self.slots = slots

    def __call__(self, round_: str, slot: int) -> tuple[str, str, int]:
        index = self.rounds[round_]
        with self.runs.get_lock():
            self.runs[index * self.slots + slot] += 1
        began = time.monotonic()
        if not self.go[index][slot].wait(EVENT_TIMEOUT):
            raise TimeoutError(
                f"round {round_}, slot {slot} was never released "
                f"(waited {time.monotonic() - began:.1f} s in process {os.getpid()})"
            )
        return (self.MARK, round_, slot)

    def on_task_success(self, result: Any = None, **_: Any) -> None:
        if isinstance(result, tuple) and result[:1] == (self.MARK,):
            self.published[self.rounds[result[1]]][result[2]].set()

    def ran(self, round_: str) -> list[int]:
        """How many times each slot's task of ``round_`` has started."""
        index = self.rounds[round_]
        return [self.runs[index * self.slots + slot] for slot in range(self.slots)]


@pytest.fixture(scope="module")
def permutation_queue() -> Iterator[tuple[ParallelSingleTaskQueue, PermutationTask]]:
    task = PermutationTask(slots=4, rounds=["".join(map(str, order)) for order in ORDERS])
    # The handler is connected while the workers fork, so they (and only
    # they) inherit it; it runs after the task's result was published.
    signals.task_success.connect(task.on_task_success, weak=False)
    try:
        queue = ParallelSingleTaskQueue(task, num_workers=4, daemon=True)
    finally:
        signals.task_success.disconnect(task.on_task_success)
    yield queue, task
    for events in task.go:
        for event in events:
            event.set()
    queue.stop()
    queue.join(timeout=RESULT_TIMEOUT)


def test_the_task_object_holds_events_that_cannot_be_pickled():
    # The premise of ParallelSingleTaskQueue: this task could not be sent to
    # a worker by pickling; it reaches the workers by inheritance instead.
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(PermutationTask(slots=1, rounds=["0"]))


@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_every_finishing_order_comes_out_in_put_order(permutation_queue, order):
    queue, task = permutation_queue
    round_ = "".join(map(str, order))
    go, published = task.go[task.rounds[round_]], task.published[task.rounds[round_]]
    for slot in range(4):
        queue.put(round_, slot)
    expected = [(PermutationTask.MARK, round_, slot) for slot in range(4)]

    taken: list[Any] = []
    released: set[int] = set()
    for slot in order:
        go[slot].set()
        assert published[slot].wait(RESULT_TIMEOUT), f"slot {slot} never finished"
        released.add(slot)
        # Everything up to the first slot still running is ready, in order...
        ready = next(s for s in range(5) if s not in released)
        taken += take(queue, ready - len(taken))
        assert taken == expected[:ready]
        # ...and nothing behind it comes out, though it may be finished.
        if ready < 4:
            with pytest.raises(Empty):
                queue.get(timeout=0.02)

    assert taken == expected
    # No fault was injected: each task ran once.
    assert task.ran(round_) == [1, 1, 1, 1]


# -- what passes through -------------------------------------------------------


def labelled(value: int, task: str) -> str:
    """A task that takes a keyword named ``task``, as ``put``'s first parameter is."""
    return f"{task}:{value}"


def test_a_task_keyword_named_task_goes_to_the_task(shared_queue):
    # The original's put(*args, **kwargs) passed every keyword but timeout on.
    shared_queue.put(labelled, 1, task="index")
    assert shared_queue.get(timeout=RESULT_TIMEOUT) == "index:1"


def test_get_takes_block_as_the_original_passed_it_to_queue_get(shared_queue):
    # The original's get(**kwargs) went to a multiprocessing queue's get.
    with pytest.raises(Empty):
        shared_queue.get(block=False)
    with pytest.raises(Empty):
        shared_queue.get(block=False, timeout=30)  # the timeout does not count
    with pytest.raises(Empty):
        shared_queue.get(block=True, timeout=0.05)
    shared_queue.put(square, 6)
    assert shared_queue.get(block=True, timeout=RESULT_TIMEOUT) == 36
    shared_queue.put(square, 7)

    def taken_without_blocking() -> tuple[Any] | None:
        try:
            return (shared_queue.get(block=False),)
        except Empty:
            return None

    assert wait_until(taken_without_blocking, "the result, taken without blocking") == (49,)


def test_non_callables_pass_through_as_markers_in_fifo_order(shared_queue):
    shared_queue.put(square, 3)
    shared_queue.put(BatchDone(1))
    shared_queue.put((1, "tuple"))
    shared_queue.put(square, 4)
    shared_queue.put(None)
    shared_queue.put({"batch": 2})

    results = take(shared_queue, 6)

    assert results == [9, 1, (1, "tuple"), 16, None, {"batch": 2}]
    assert type(results[1]) is BatchDone
    assert type(results[2]) is tuple


def test_a_marker_with_arguments_is_refused_and_leaves_no_gap(shared_queue):
    with pytest.raises(ValueError, match="not callable"):
        shared_queue.put(6, 7)

    shared_queue.put(square, 5)
    assert shared_queue.get(timeout=RESULT_TIMEOUT) == 25


def test_a_task_exception_is_raised_at_its_position_with_the_workers_stack_trace(
    shared_queue,
):
    shared_queue.put(square, 2)
    shared_queue.put(raise_value_error, "bad document")
    shared_queue.put(square, 3)

    assert shared_queue.get(timeout=RESULT_TIMEOUT) == 4
    with pytest.raises(ValueError, match="bad document") as raised:
        shared_queue.get(timeout=RESULT_TIMEOUT)
    assert type(raised.value) is ValueError
    assert "raise_value_error" in raised.value.stack_trace
    assert "ValueError: bad document" in raised.value.stack_trace
    assert shared_queue.get(timeout=RESULT_TIMEOUT) == 9


def test_a_custom_exception_round_trips_exactly(shared_queue):
    shared_queue.put(refuse, 403)

    with pytest.raises(Refused) as raised:
        shared_queue.get(timeout=RESULT_TIMEOUT)
    assert type(raised.value) is Refused
    assert raised.value.args == (403, "not today")
    assert (raised.value.code, raised.value.detail) == (403, "not today")
    assert "refuse" in raised.value.stack_trace


def test_custom_classes_round_trip_as_arguments_and_results(shared_queue):
    shared_queue.put(make_point, 1, 2)
    shared_queue.put(shift, Point(1, 2), dx=10)
    shared_queue.put(Point(7, 7))

    assert take(shared_queue, 3) == [Point(1, 2), Point(11, 2), Point(7, 7)]


def test_the_put_timeout_is_not_passed_to_the_task(shared_queue):
    shared_queue.put(arguments_of, "data", timeout=5)
    shared_queue.put(arguments_of, "data", flag=True, timeout=5)

    assert take(shared_queue, 2) == [(("data",), {}), (("data",), {"flag": True})]


def test_get_with_a_timeout_raises_queue_empty(shared_queue):
    began = time.monotonic()
    with pytest.raises(Empty):
        shared_queue.get(timeout=0.2)
    assert time.monotonic() - began >= 0.2


def test_a_nested_function_is_refused_with_a_pointer_to_the_single_task_queue(shared_queue):
    # The README: "constructions like this are not going to work".
    with pytest.raises(TypeError, match="ParallelSingleTaskQueue"):
        shared_queue.put(make_greeter("curried"), "eggs")
    with pytest.raises(TypeError, match="lambda"):
        shared_queue.put(lambda x: x, 1)

    shared_queue.put(square, 6)  # the refusals left no gap
    assert shared_queue.get(timeout=RESULT_TIMEOUT) == 36


# -- sizes ---------------------------------------------------------------------


def test_sequence_numbers_run_far_beyond_every_buffer_size():
    count, batch = 500, 50
    queue = ParallelQueue(
        num_workers=2, in_q_max=1, worker_q_max=1, consumer_buffer_max=4, out_q_max=3
    )
    window = 1 + 2 + 1 + 4 + 3  # every place of the original, added up
    results: list[Any] = []
    peak_ahead = [0]
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            for _ in range(count + count // batch):
                results.append(queue.get(timeout=RESULT_TIMEOUT))
                stats = queue.stream.stats()
                peak_ahead[0] = max(peak_ahead[0], stats.claimed - stats.delivered)
        except BaseException as exc:
            failures.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert queue.stream.window == window
        for i in range(count):
            queue.put(uneven_square, i, (i * 7919 % 5) / 1000, timeout=RESULT_TIMEOUT)
            if i % batch == batch - 1:
                queue.put(BatchDone(i // batch), timeout=RESULT_TIMEOUT)
        queue.stop()
    finally:
        consumer.join(timeout=120)
        queue.stop()
        queue.join(timeout=RESULT_TIMEOUT)

    assert not failures, failures
    expected: list[Any] = []
    for i in range(count):
        expected.append(i * i)
        if i % batch == batch - 1:
            expected.append(BatchDone(i // batch))
    assert results == expected
    assert [type(r) for r in results if isinstance(r, BatchDone)] == [BatchDone] * 10
    assert peak_ahead[0] <= window
    assert not queue.is_alive()


class Gate:
    """A task that waits until the test opens the gate."""

    def __init__(self) -> None:
        self.started = multiprocessing.Event()
        self.opened = multiprocessing.Event()

    def __call__(self, value: Any) -> Any:
        self.started.set()
        if not self.opened.wait(EVENT_TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        return value


def test_join_with_a_timeout_returns_while_a_task_still_runs():
    gate = Gate()
    queue = ParallelSingleTaskQueue(
        gate, num_workers=1, in_q_max=1, out_q_max=1, worker_q_max=1, consumer_buffer_max=1
    )
    try:
        queue.put("first")
        assert gate.started.wait(RESULT_TIMEOUT)
        for i in range(4):
            queue.put(f"waiting {i}", timeout=RESULT_TIMEOUT)
        with pytest.raises(Full):
            queue.put("one too many", timeout=0.2)  # the window of 1+1+1+1+1 is taken
        queue.stop()  # returns at once, though a task still runs
        with pytest.raises(ValueError, match="close"):
            queue.put("too late")

        began = time.monotonic()
        queue.join(timeout=0.3)
        waited = time.monotonic() - began

        assert queue.is_alive()
        assert 0.3 <= waited < 5
        with pytest.raises(Empty):
            queue.get(timeout=0.05)

        gate.opened.set()
        queue.join(timeout=RESULT_TIMEOUT)

        assert not queue.is_alive()
        # The workers are gone, but what was not taken yet is still there.
        assert take(queue, 5) == ["first", *(f"waiting {i}" for i in range(4))]
        with pytest.raises(Empty):
            queue.get(timeout=0.05)
        with pytest.raises(StreamExhausted):
            queue.get()
    finally:
        gate.opened.set()
        queue.stop()
        queue.join(timeout=RESULT_TIMEOUT)


def test_the_window_adds_up_every_place_the_original_held_an_item():
    # The original (parallel_queue 0.5): an input queue (in_q_max), one item in
    # each worker's hands, one queue from the workers to the consumer
    # (worker_q_max, shared), the consumer's reordering buffer
    # (consumer_buffer_max) and the output queue get() reads (out_q_max).
    assert window_for(3, in_q_max=4, out_q_max=4, worker_q_max=1, consumer_buffer_max=3) == 15
    # Its defaults: 1000, 1000, 100 and 10 per worker.
    assert window_for(2) == 1000 + 2 + 100 + 20 + 1000


@pytest.mark.parametrize("size", ["in_q_max", "out_q_max", "worker_q_max", "consumer_buffer_max"])
def test_a_size_of_zero_is_refused_by_name(size):
    # The original read 0 as "unbounded" (multiprocessing.Queue(maxsize=0)).
    with pytest.raises(ValueError, match=f"{size} must be .*int >= 1, got 0"):
        ParallelQueue(num_workers=1, **{size: 0})


def test_putting_more_than_the_consumer_buffer_before_any_get_does_not_block():
    # Issue 15's scenario: the original's put blocks only on a full input
    # queue (1000 by default), whatever consumer_buffer_max says.
    task = PermutationTask(slots=4, rounds=["sizes"])
    go = task.go[0]
    queue = ParallelSingleTaskQueue(task, num_workers=3, consumer_buffer_max=3, daemon=True)
    try:
        for slot in range(3):
            queue.put("sizes", slot, timeout=3)
        try:
            queue.put("sizes", 3, timeout=5)
        except Full:
            raise AssertionError("timed out putting 3") from None
        for slot in (3, 1, 2, 0):
            go[slot].set()
        assert take(queue, 4) == [(PermutationTask.MARK, "sizes", slot) for slot in range(4)]
    finally:
        for event in go:
            event.set()
        queue.stop()
        queue.join(timeout=RESULT_TIMEOUT)


def test_what_the_original_accepted_before_any_get_is_accepted_and_no_more():
    # Issue 15's sizes. With its tasks finishing at once and nobody calling
    # get(), the original holds at most 4 (out_q) + 3 (consumer) + 3 (hands)
    # + 4 (in_q) = 14 before put blocks; the window here is that plus the
    # workers' queue (1), so all 14 go in and the bound still holds after.
    gate = Gate()
    queue = ParallelSingleTaskQueue(
        gate, num_workers=3, in_q_max=4, out_q_max=4, worker_q_max=1, consumer_buffer_max=3
    )
    try:
        assert queue.stream.window == 15
        for i in range(15):
            queue.put(i, timeout=RESULT_TIMEOUT)
        with pytest.raises(Full):
            queue.put(15, timeout=0.2)
        gate.opened.set()
        assert take(queue, 15) == list(range(15))
        queue.put(15, timeout=RESULT_TIMEOUT)  # taken results free the window
        assert queue.get(timeout=RESULT_TIMEOUT) == 15
    finally:
        gate.opened.set()
        queue.stop()
        queue.join(timeout=RESULT_TIMEOUT)


# -- ParallelSingleTaskQueue ---------------------------------------------------


def test_single_task_queue_runs_a_closure_by_inheritance():
    greeter = ParallelSingleTaskQueue(make_greeter("Hello"), num_workers=1)
    try:
        greeter.put("eggs")
        greeter.put(name="spam")
        greeter.stop()
        greeter.join(timeout=RESULT_TIMEOUT)

        assert take(greeter, 2) == ["Hello, eggs", "Hello, spam"]
    finally:
        greeter.stop()
        greeter.join(timeout=RESULT_TIMEOUT)


def test_single_task_queue_refuses_a_non_callable():
    with pytest.raises(TypeError, match="callable"):
        ParallelSingleTaskQueue("not a function", num_workers=1)


# -- worker_init_f -------------------------------------------------------------


def test_worker_init_f_runs_once_in_each_worker_process():
    inits: multiprocessing.Queue[int] = multiprocessing.Queue()

    def init() -> None:
        WORKER_STATE["initialised_in"] = os.getpid()
        inits.put(os.getpid())

    queue = ParallelQueue(num_workers=2, worker_init_f=init)
    try:
        pool = footprint(queue._cluster).pool_pids
        reported = [inits.get(timeout=RESULT_TIMEOUT) for _ in range(2)]
        for _ in range(6):
            queue.put(initialised_here)
            queue.put(current_pid)
        results = take(queue, 12)
    finally:
        queue.stop()
        queue.join(timeout=RESULT_TIMEOUT)

    assert sorted(reported) == sorted(pool)
    assert len(pool) == 2
    with pytest.raises(Empty):
        inits.get(timeout=0.1)  # one call per process, no more
    assert results[0::2] == [True] * 6  # each task saw its process's init
    assert set(results[1::2]) <= pool
    assert "initialised_in" not in WORKER_STATE  # it ran there, not here


def test_worker_init_f_with_an_app_is_refused(app):
    with pytest.raises(ValueError, match="worker_process_init"):
        ParallelQueue(app=app, worker_init_f=lambda: None)


# -- on a Celery fleet ---------------------------------------------------------


def test_parallel_queue_runs_on_a_celery_fleet(app, worker):
    from tests.apps.tasks import echo, pid, plain_add

    queue = ParallelQueue(
        app=app, num_workers=1, in_q_max=2, out_q_max=2, worker_q_max=1, consumer_buffer_max=2
    )
    assert queue.stream.window == 8
    for i in range(7):
        queue.put(echo, i, timeout=RESULT_TIMEOUT)
    queue.put("batch done", timeout=RESULT_TIMEOUT)
    with pytest.raises(Full):
        queue.put(echo, 99, timeout=0.1)  # 8 ahead of the consumer: the window is full
    assert take(queue, 8) == [*range(7), "batch done"]

    queue.put(plain_add, 2, y=3, timeout=RESULT_TIMEOUT)
    for _ in range(4):
        queue.put(pid, timeout=RESULT_TIMEOUT)
    queue.stop()

    assert queue.get(timeout=RESULT_TIMEOUT) == 5
    assert set(take(queue, 4)) <= descendants(worker.pid)  # the fleet's processes ran them
    queue.join(timeout=RESULT_TIMEOUT)
    assert not queue.is_alive()
    with pytest.raises(StreamExhausted):
        queue.get()
    assert worker.proc.poll() is None  # join() leaves someone else's fleet running


def test_single_task_queue_runs_a_top_level_function_on_a_celery_fleet(app, worker):
    from tests.apps.tasks import plain_add

    queue = ParallelSingleTaskQueue(plain_add, app=app)
    queue.put(1, 2)
    queue.put(10, y=5)
    queue.stop()

    assert take(queue, 2) == [3, 15]
    queue.join(timeout=RESULT_TIMEOUT)
    assert not queue.is_alive()


def test_results_not_taken_before_join_stay_gettable_on_a_celery_fleet(app, worker):
    from tests.apps.tasks import echo

    queue = ParallelQueue(app=app)
    queue.put(echo, "kept")
    queue.stop()
    queue.join(timeout=RESULT_TIMEOUT)

    assert not queue.is_alive()
    assert queue.get(timeout=RESULT_TIMEOUT) == "kept"


# -- nothing outlives the queue ------------------------------------------------


def test_stop_and_join_end_every_process_and_remove_the_directory():
    queue = ParallelQueue(num_workers=2)
    fp = footprint(queue._cluster)
    fp.assert_running()
    assert queue.is_alive()
    queue.put(square, 9)
    queue.stop()
    queue.join(timeout=RESULT_TIMEOUT)

    assert not queue.is_alive()
    fp.wait_gone()
    assert queue.get(timeout=1) == 81


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "not-daemon"])
def test_an_unstopped_queue_that_is_garbage_collected_leaves_nothing(daemon, capfd):
    queue = ParallelQueue(num_workers=1, daemon=daemon)
    queue.put(square, 5)
    assert queue.get(timeout=RESULT_TIMEOUT) == 25
    fp = footprint(queue._cluster)

    del queue
    gc.collect()

    fp.wait_gone()
    assert "Exception ignored" not in capfd.readouterr().err


OWNER_OF_A_QUEUE = """
import multiprocessing
from celery_ordered import ParallelQueue, ParallelSingleTaskQueue

def shout(word):  # defined in __main__: the forked workers have it
    return word.upper() + "!"

queue = ParallelQueue(num_workers=2)
queue.put(shout, "eggs")
result = queue.get(timeout=60)

started = multiprocessing.Event()
def hang():
    started.set()
    threading.Event().wait()

busy = ParallelSingleTaskQueue(hang, num_workers=1)
busy.put()
assert started.wait(60)
report(queue._cluster, result=result)
report(busy._cluster)
block()
"""


def test_killing_the_owner_with_sigkill_ends_its_workers_and_redis():
    owner = Owner(OWNER_OF_A_QUEUE)
    try:
        idle, busy = owner.footprint(), owner.footprint()
        assert idle.extra["result"] == "EGGS!"
        idle.assert_running()
        busy.assert_running()
    finally:
        owner.kill()

    idle.wait_gone()
    busy.wait_gone()


OLDER_AND_NEWER = """
import time
from celery_ordered import ParallelQueue

older = ParallelQueue(num_workers=1)
newer = ParallelQueue(num_workers=1)
report(older._cluster)
report(newer._cluster)
began = time.monotonic()
older.stop()
older.join(timeout=60)
print("STOPPED", time.monotonic() - began, flush=True)
newer.stop()
newer.join(timeout=60)
"""


def test_stopping_an_older_queue_is_prompt_while_a_newer_one_runs():
    owner = Owner(OLDER_AND_NEWER)
    try:
        footprints = [owner.footprint(), owner.footprint()]
        seconds = float(owner.read_line("STOPPED ", timeout=4))
        assert seconds < 4
        assert owner.wait() == 0
    finally:
        owner.kill()
    for fp in footprints:
        fp.wait_gone()
