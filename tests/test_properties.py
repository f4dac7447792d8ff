"""Property-based: any interleaving of claim, publish (with duplicates) and pop
keeps the invariants of docs/how-it-works.md, checked against the real scripts in Redis."""

from __future__ import annotations

import uuid
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import Protocol

RECORD = b"0:M:application/json:utf-8:null"

operations = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.integers(1, 4)),
        st.tuples(st.just("publish"), st.integers(0, 30)),
        st.tuples(st.just("pop"), st.integers(0, 5)),
    ),
    max_size=40,
)


def member(seq: int) -> bytes:
    return b"%d:r:application/json:utf-8:%d" % (seq, seq)


@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(window=st.integers(1, 6), ops=operations)
def test_any_interleaving_keeps_the_invariants(
    redis_client: redis.Redis, window: int, ops: list[tuple[str, int]]
) -> None:
    name = f"test-prop-{uuid.uuid4().hex}"
    proto = Protocol(redis_client, name)
    proto.open(uuid.uuid4().hex, create=True)  # as a stream handle opens it
    claimed = 0  # numbers handed out
    published: set[int] = set()  # numbers whose first outcome is stored
    delivered: list[int] = []  # what the consumer read, in order
    acked = [0]  # below this, the consumer told Redis it is done
    try:

        def pop(limit: int) -> None:
            # A consumer that acknowledges, on each call, all it read before.
            batch = proto.pop(len(delivered), len(delivered), limit)
            acked[0] = len(delivered)
            assert batch.next == acked[0]
            for raw in batch.members:
                delivered.append(int(raw.split(b":", 1)[0]))

        def check() -> None:
            stats = proto.stats()
            assert stats.claimed == claimed
            assert stats.claimed - stats.next <= window  # invariant 2
            assert delivered == list(range(len(delivered)))  # in order, each once
            assert stats.next == acked[0] <= len(delivered)
            assert stats.stored == len(published - set(range(stats.next)))

        for op, arg in ops:
            if op == "claim":
                claim = proto.claim([RECORD] * arg, window, producer="p", claim_id=uuid.uuid4().hex)
                room = window - (claimed - acked[0])
                assert claim.count == max(0, min(arg, room))
                claimed += claim.count
            elif op == "publish" and claimed:
                seq = arg % claimed
                stored = proto.publish(seq, member(seq))
                fresh = seq not in published and seq >= acked[0]
                assert stored == (1 if fresh else 0)  # invariant 3: first outcome wins
                published.add(seq)
            elif op == "pop":
                pop(arg)
            check()

        # Every claimed number, once filled, is delivered exactly once, in order.
        for seq in range(claimed):
            proto.publish(seq, member(seq))
        while len(delivered) < claimed:
            before = len(delivered)
            pop(10)
            assert len(delivered) > before
        pop(10)
        assert delivered == list(range(claimed))
        assert redis_client.hlen(StreamKeys(name).results) == 0
    finally:
        proto.delete()


def test_a_retried_claim_returns_the_same_numbers(redis_client: Any) -> None:
    # A claim whose reply was lost is retried by the client with the same id.
    proto = Protocol(redis_client, f"test-prop-{uuid.uuid4().hex}")
    proto.open(uuid.uuid4().hex, create=True)
    try:
        first = proto.claim([RECORD] * 2, 10, producer="p", claim_id="one")
        again = proto.claim([RECORD] * 2, 10, producer="p", claim_id="one")
        other = proto.claim([RECORD], 10, producer="p", claim_id="two")
        assert (first.first, first.count) == (again.first, again.count) == (0, 2)
        assert (other.first, other.count) == (2, 1)
        assert proto.stats().claimed == 3
    finally:
        proto.delete()
