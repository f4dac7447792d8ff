"""The Redis scripts, through Protocol and raw, against the real Redis."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import Protocol, script_source
from tests.apps.tasks import echo


def member(seq: int, value: Any, status: str = "r") -> bytes:
    """An outcome as the workers write it."""
    return f"{seq}:{status}:application/json:utf-8:".encode() + json.dumps(value).encode()


@pytest.fixture
def name(redis_client: redis.Redis) -> Any:
    """A fresh stream name; its keys are removed afterwards."""
    name = f"test-scripts-{uuid.uuid4().hex}"
    yield name
    redis_client.delete(*StreamKeys(name).all())


@pytest.fixture
def proto(redis_client: redis.Redis, name: str) -> Protocol:
    """A Protocol on a stream it created, as a stream handle does."""
    proto = Protocol(redis_client, name)
    proto.open(uuid.uuid4().hex, create=True)
    return proto


#: A dispatch record as put writes it (here: for a marker holding {}).
RECORD = b"0:M:application/json:utf-8:{}"


def claim_numbers(proto: Protocol, wanted: int, default_window: int) -> Any:
    """Claim ``wanted`` numbers as one producer's single call."""
    return proto.claim(
        [RECORD] * wanted, default_window, producer="tests", claim_id=uuid.uuid4().hex
    )


def waiting_deadlines(client: redis.Redis, key: str) -> list[bytes]:
    """The numbers in a stream's ``deadlines``, by deadline: every member but
    the one scored +inf that keeps the set a skiplist (claim.lua)."""
    return client.zrangebyscore(key, "-inf", "(+inf")


def past_in_redis_time(client: redis.Redis, ms: float) -> None:
    """Return once Redis's own clock (TIME, which the scripts read) is past ``ms``."""
    while (lambda t: t[0] * 1000 + t[1] // 1000)(client.time()) <= ms:
        pass


def stream_keys(client: redis.Redis, name: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"co:{{{name}}}:*"))


def test_claim_respects_the_window(proto):
    first = claim_numbers(proto, 5, 3)  # no window stored yet: 3 is the default
    assert (first.first, first.count, first.closed) == (0, 3, False)
    assert proto.stats().window == 3
    full = claim_numbers(proto, 1, 3)
    assert (full.first, full.count, full.closed) == (3, 0, False)
    # Deliver two: two numbers free up.
    proto.publish(0, member(0, "a"))
    proto.publish(1, member(1, "b"))
    proto.pop(2, -1, 0)
    again = claim_numbers(proto, 5, 3)
    assert (again.first, again.count) == (3, 2)
    assert proto.stats().claimed == 5


def test_claim_after_close_claims_nothing(proto):
    assert claim_numbers(proto, 2, 10).count == 2
    assert proto.close() == 2
    claim = claim_numbers(proto, 1, 10)
    assert claim.closed
    assert claim.count == 0
    assert proto.stats().claimed == 2
    assert proto.close() == 2  # idempotent: still the number at the first close


def test_publish_first_outcome_wins_and_duplicates_are_dropped(proto, redis_client):
    claim_numbers(proto, 3, 10)
    assert proto.publish(0, member(0, "first")) == 1
    assert proto.publish(0, member(0, "second")) == 0  # duplicate: already filled
    assert redis_client.hlen(proto.keys.results) == 1
    # A number past every claim: said to be claimed in this incarnation, the
    # stream's state went back (-2); with no incarnation, it cannot tell (-1)
    assert proto.publish(7, member(7, "never claimed")) == -2
    assert proto.publish(7, member(7, "never claimed"), incarnation="") == -1
    assert redis_client.hlen(proto.keys.results) == 1

    batch = proto.pop(-1, -1, 10)
    assert batch.members == [member(0, "first")]
    # Delivered: acknowledge, then a late outcome for it is dropped too.
    batch = proto.pop(1, 1, 10)
    assert batch.next == 1
    assert redis_client.hlen(proto.keys.results) == 0
    assert proto.publish(0, member(0, "late")) == 0
    assert redis_client.hlen(proto.keys.results) == 0

    assert proto.publish(1, member(1, "one")) == 1
    assert proto.publish(2, member(2, "two")) == 1
    assert proto.pop(-1, 1, 10).members == [member(1, "one"), member(2, "two")]
    assert proto.pop(3, 3, 10).members == []  # acknowledge both
    for seq in range(3):
        assert proto.publish(seq, member(seq, "late again")) == 0
    assert redis_client.hlen(proto.keys.results) == 0


def test_pop_returns_only_the_gapless_run(proto):
    claim_numbers(proto, 5, 10)
    for seq in (1, 2, 4):
        proto.publish(seq, member(seq, seq))
    batch = proto.pop(-1, -1, 10)
    assert (batch.next, batch.start, batch.stored, batch.closed_at) == (0, 0, 3, None)
    assert batch.members == []  # 0 is missing: nothing can go yet
    stats = proto.stats()
    assert (stats.stored, stats.contiguous) == (3, 0)

    proto.publish(0, member(0, 0))
    batch = proto.pop(-1, -1, 10)
    assert batch.members == [member(s, s) for s in (0, 1, 2)]
    # Reading on from 3 without acknowledging: 3 is missing.
    batch = proto.pop(-1, 3, 10)
    assert (batch.start, batch.members) == (3, [])
    # The limit caps the run.
    assert proto.pop(-1, 0, 2).members == [member(0, 0), member(1, 1)]

    proto.publish(3, member(3, 3))
    batch = proto.pop(3, 3, 10)  # acknowledge 0..2, read on from 3
    assert (batch.next, batch.stored) == (3, 2)
    assert batch.members == [member(3, 3), member(4, 4)]
    assert proto.stats().contiguous == 2


def test_stats_snapshot(proto):
    raw = proto.stats()
    assert (raw.claimed, raw.next, raw.window, raw.stored, raw.closed_at) == (0, 0, 0, 0, None)
    assert raw.head_claimed_ms is None  # nothing claimed: nothing waits
    assert raw.now_ms > 0
    claim_numbers(proto, 4, 6)
    proto.publish(2, member(2, "x"))
    proto.publish(0, member(0, "y"))
    raw = proto.stats()
    assert raw.head_claimed_ms is not None
    assert 0 <= raw.now_ms - raw.head_claimed_ms < 60_000  # the head waits since its claim
    assert (raw.claimed, raw.next, raw.window, raw.stored, raw.contiguous) == (4, 0, 6, 2, 1)
    proto.close()
    assert proto.stats().closed_at == 4


def test_late_results_leave_no_garbage_and_delete_leaves_nothing(proto, redis_client, name):
    claim_numbers(proto, 2, 4)
    proto.publish(0, member(0, "a"))
    proto.publish(1, member(1, "b"))
    proto.close()
    assert len(proto.pop(2, -1, 10).members) == 0  # acknowledged both
    assert redis_client.hlen(proto.keys.results) == 0
    assert proto.publish(1, member(1, "late")) == 0
    assert redis_client.hlen(proto.keys.results) == 0

    assert proto.delete() > 0
    assert stream_keys(redis_client, name) == []
    # A worker finishing after the delete: dropped, and nothing is recreated.
    assert proto.publish(0, member(0, "after delete")) == -1
    assert proto.publish(5, member(5, "after delete")) == -1
    assert stream_keys(redis_client, name) == []


def test_duplicate_and_late_outcomes_never_reach_a_consumer(make_stream, redis_client):
    stream = make_stream(window=8)
    proto = Protocol(redis_client, stream.name)
    first = stream.put("original")
    # A second outcome for a number already filled (a redelivered task).
    assert proto.publish(first, member(first, "duplicate")) == 0
    second = stream.put({"n": 2})
    assert stream.get(timeout=5) == "original"
    assert stream.get(timeout=5) == {"n": 2}
    stream.ack()
    # Late outcomes for numbers already delivered.
    assert proto.publish(first, member(first, "late")) == 0
    assert proto.publish(second, member(second, "late")) == 0
    stream.put("third")
    stream.close()
    assert list(stream) == ["third"]
    stats = stream.stats()
    assert (stats.claimed, stats.delivered, stats.buffered) == (3, 3, 0)
    assert redis_client.hlen(StreamKeys(stream.name).results) == 0
    assert proto.publish(first, member(first, "later still")) == 0
    assert redis_client.hlen(StreamKeys(stream.name).results) == 0

    stream.delete()
    assert stream_keys(redis_client, stream.name) == []
    assert proto.publish(first, member(first, "after delete")) == -1
    assert stream_keys(redis_client, stream.name) == []


# -- script cache and pipelines -----------------------------------------------------


def test_streams_work_across_a_script_flush(worker, make_stream, redis_client):
    stream = make_stream(window=4)
    stream.put(echo, "before flush")
    assert stream.get(timeout=30) == "before flush"
    # Every cached script is gone: producer, consumer and the workers' publish
    # must all load them again by themselves.
    redis_client.script_flush()
    stream.put(echo, "after flush")
    assert stream.get(timeout=30) == "after flush"
    redis_client.script_flush()
    stream.close()
    assert list(stream) == []
    assert stream.stats().claimed == 2


def _lua(script: str) -> str:
    return script_source(script)  # the script behind the prelude, as protocol.py loads it


@pytest.mark.parametrize("flush_first", [False, True], ids=["cached", "after flush"])
def test_scripts_run_inside_a_pipeline(redis_client, name, flush_first):
    # As redis-py's own tests do: Script objects called with client=pipeline.
    claim, publish, pop, close, stats = (
        redis_client.register_script(_lua(s)) for s in ("claim", "publish", "pop", "close", "stats")
    )
    k = StreamKeys(name)
    claim_keys = [k.seq, k.next, k.window, k.closed, k.space, k.pending, k.deadlines, k.producers,
                  k.created, k.results, k.adapt]  # fmt: skip
    publish_keys = [k.seq, k.next, k.results, k.ready, k.closed, k.done, k.pending, k.created,
                    k.window, k.space, k.adapt]  # fmt: skip
    redis_client.set(k.created, "inc-1")  # the stream's incarnation, as window.lua writes it
    if flush_first:
        redis_client.script_flush()
    with redis_client.pipeline() as pipe:
        claim(
            keys=claim_keys,
            args=[3, 8, 0, 0, "p", "c1", "inc-1", RECORD, RECORD, RECORD],
            client=pipe,
        )
        publish(keys=publish_keys, args=[2, member(2, "c"), 0, "inc-1"], client=pipe)
        publish(keys=publish_keys, args=[0, member(0, "a"), 0, ""], client=pipe)
        publish(keys=publish_keys, args=[0, member(0, "dup"), 0, "inc-1"], client=pipe)
        publish(keys=publish_keys, args=[1, member(1, "b"), 0, "inc-1"], client=pipe)
        stats(
            keys=[k.seq, k.next, k.window, k.results, k.closed, k.pending, k.created, k.counters,
                  k.deadlines, k.lanes, k.adapt],
            client=pipe,
        )  # fmt: skip
        close(
            keys=[k.seq, k.next, k.results, k.closed, k.ready, k.done, k.space, k.created,
                  k.error],
            args=[0, "inc-1", ""],
            client=pipe,
        )  # fmt: skip
        pop(
            keys=[k.next, k.results, k.closed, k.space, k.ready, k.window, k.seq, k.created,
                  k.consumer, k.error, k.adapt, k.pending, k.deadlines],
            args=[-1, -1, 10, 0, "inc-1", "consumer-1", 0, 30000, ""],
            client=pipe,
        )  # fmt: skip
        results = pipe.execute()
    claimed, *published, snapshot, closed_at, popped = results
    assert claimed == [0, 3]
    assert published == [1, 1, 0, 1]
    assert snapshot[:6] == [3, 0, 8, 3, 3, -1]
    # The incarnation; nothing re-dispatched, lost or hedged; no blocker to describe.
    assert snapshot[8:12] == [b"inc-1", 0, 0, 0]
    assert snapshot[12:] == [b"", b"", b"", b"", b"", 0, -1, b"", b""]  # a fixed window
    assert closed_at == 3
    assert popped[:8] == [0, 3, 3, 0, 8, 1, 3, b""]  # ..., epoch 1, 3 claimed, no error
    assert popped[-3:] == [member(0, "a"), member(1, "b"), member(2, "c")]


def test_a_lost_head_behind_a_window_of_filled_numbers_is_reclaimed_in_one_call(
    proto, redis_client
):
    # A filled number keeps its deadline until the consumer acknowledges it
    # (pop.lua removes it then): behind a lost head, a whole window of filled
    # numbers comes due with it, and must not hide it from reclaim. One claim
    # gives them one deadline, and Redis orders equal scores by member, so
    # "999" comes after every other: ten pages of reclaim's hundred.
    claim = proto.claim(
        [RECORD] * 1000, 1024, producer="tests", claim_id=uuid.uuid4().hex, lost_after=0.001
    )
    assert (claim.first, claim.count) == (0, 1000)
    for n in range(999):
        assert proto.publish(n, member(n, n)) == 1
    k = proto.keys
    due = redis_client.zscore(k.deadlines, "999")
    assert due is not None
    past_in_redis_time(redis_client, due)
    overdue = proto.reclaim(0.001, 3)
    assert [(o.seq, o.lost, o.why) for o in overdue] == [(999, False, "idle")]
    # The filled numbers it met were forgotten on the way: only 999 waits.
    assert waiting_deadlines(redis_client, k.deadlines) == [b"999"]
    # The consumer gets every outcome before the head, not the head.
    batch = proto.pop(-1, -1, 2000, owner="tests", epoch=0, lease=30)
    assert [int(m.split(b":")[0]) for m in batch.members] == list(range(999))


def test_the_pop_that_acknowledges_numbers_removes_what_they_left(proto, redis_client):
    # A publish removes only the number's record (the first outcome wins by
    # it); its claim time and deadline go with the acknowledgement, per block.
    k = proto.keys
    proto.claim([RECORD] * 4, 8, producer="tests", claim_id=uuid.uuid4().hex, lost_after=600)
    for n in range(3):
        assert proto.publish(n, member(n, n)) == 1
    assert proto.publish(1, member(1, "again")) == 0  # its record is gone: a duplicate
    assert sorted(redis_client.hkeys(k.pending)) == [b"3", b"t:0", b"t:1", b"t:2", b"t:3"]
    assert waiting_deadlines(redis_client, k.deadlines) == [b"0", b"1", b"2", b"3"]
    batch = proto.pop(-1, -1, 10, owner="tests", epoch=0, lease=30)
    assert [int(m.split(b":")[0]) for m in batch.members] == [0, 1, 2]
    assert batch.members[1] == member(1, 1)
    proto.pop(3, 3, 10, owner="tests", epoch=batch.epoch, lease=30)
    assert sorted(redis_client.hkeys(k.pending)) == [b"3", b"t:3"]
    assert waiting_deadlines(redis_client, k.deadlines) == [b"3"]
    assert redis_client.hlen(k.results) == 0
    assert proto.publish(2, member(2, "late")) == 0  # delivered: dropped, nothing stored
    assert redis_client.hlen(k.results) == 0


def test_a_claim_keeps_the_deadlines_a_skiplist_with_a_member_never_due(proto, redis_client):
    # A window's few dozen deadlines would sit in a listpack, whose every
    # insert walks the whole set; a member over 64 bytes, scored +inf, keeps
    # the sorted set a skiplist. Reclaim never meets it: it is never due.
    k = proto.keys
    claim = proto.claim(
        [RECORD] * 4, 8, producer="tests", claim_id=uuid.uuid4().hex, lost_after=0.001
    )
    assert (claim.first, claim.count) == (0, 4)
    assert redis_client.object("encoding", k.deadlines) == b"skiplist"
    assert waiting_deadlines(redis_client, k.deadlines) == [b"0", b"1", b"2", b"3"]
    (skiplist,) = redis_client.zrangebyscore(k.deadlines, "+inf", "+inf")
    assert len(skiplist) > 64
    due = redis_client.zscore(k.deadlines, "3")
    past_in_redis_time(redis_client, due)
    overdue = proto.reclaim(0.001, 3)
    assert sorted((o.seq, o.why) for o in overdue) == [(n, "idle") for n in range(4)]
    # Each number re-dispatched has a deadline again; the member is still there.
    assert redis_client.zscore(k.deadlines, skiplist) == float("inf")
