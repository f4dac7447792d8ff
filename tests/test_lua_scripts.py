"""Each Lua script's header tells the truth about what protocol.py passes it.

Every script opens with a table (``-- KEYS[i]  name ...``, ``-- ARGV[i]  name
...``). Here the real operations of :class:`~celery_ordered.redis.protocol.Protocol`
run against the real Redis while a spy on ``_call`` records the keys and
arguments each script received; the header must name those keys, in order,
and every argument passed. The scripts share one prelude (``_prelude.lua``):
the clock, the wake token and expiry renewal are written there once.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import redis

from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import PRELUDE, SCRIPTS, Protocol, script_source

LUA = resources.files("celery_ordered.redis").joinpath("lua")

#: ``-- KEYS[3]  window ...``: a key's place and its name (the last part of the key).
KEY_LINE = re.compile(r"^-- KEYS\[(\d+)\]\s+(\w+)", re.M)
# "-- KEYS[12..] ...": a renewing call passes the stream's other keys after the named ones.
REST_LINE = re.compile(r"^-- KEYS\[(\d+)\.\.\]", re.M)
#: ``-- ARGV[2]  default ...``, or ``-- ARGV[8..7+wanted]`` for a variable tail.
ARGV_LINE = re.compile(r"^-- ARGV\[(\d+)(?:\.\.(\d+)\+(\w+))?\]", re.M)

RECORD = b"0:M:application/json:utf-8:null"


def file_text(name: str) -> str:
    """The file ``lua/<name>.lua`` as it is in the package."""
    return LUA.joinpath(f"{name}.lua").read_text("utf-8")


def header(name: str) -> str:
    """The table of script ``name``'s header: its ``KEYS[i]`` and ``ARGV[i]`` rows.

    The table starts at ``-- KEYS[1]`` and runs while lines are rows or their
    continuations (``--`` and an indent); the prose after it may mention
    ``KEYS[3]`` too, and is left out.
    """
    lines = file_text(name).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-- KEYS[1]"))
    rows = []
    for line in lines[start:]:
        if not re.match(r"-- (KEYS|ARGV)\[|--\s{3,}\S", line):
            break
        rows.append(line)
    return "\n".join(rows)


def code(text: str) -> str:
    """``text`` without its Lua comments."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


class Recording(Protocol):
    """A Protocol that notes the keys, arguments and durability of every script it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, list[str], list[Any], bool]] = []

    def _call(self, name: str, keys: list[str], args: list[Any], *, durable: bool = True) -> Any:
        self.calls.append((name, list(keys), list(args), durable))
        return super()._call(name, keys, args, durable=durable)


@pytest.fixture
def recorded(redis_client: redis.Redis) -> Iterator[Recording]:
    """Every operation of the protocol, run once on a fresh stream; its keys removed after."""
    name = f"test-lua-{uuid.uuid4().hex}"
    proto = Recording(redis_client, name, ttl=60)
    try:
        proto.open(uuid.uuid4().hex, create=True, window=4)
        attached = Recording(redis_client, name, ttl=60)
        attached.calls = proto.calls  # one record of every call
        assert attached.open(uuid.uuid4().hex, create=False) == 4
        proto.set_window(8)
        claim = proto.claim([RECORD, RECORD], 8, producer="p", claim_id="c1", lost_after=0.001)
        assert (claim.first, claim.count) == (0, 2)
        assert proto.publish(1, b"1:r:application/json:utf-8:1") == 1
        # Number 0 is overdue as soon as Redis's clock moves on by a millisecond:
        # reclaim until it comes back (no sleep: each call reads Redis's clock).
        deadline = time.monotonic() + 30
        overdue = proto.reclaim(0.001, 3)
        while not overdue and time.monotonic() < deadline:
            overdue = proto.reclaim(0.001, 3)
        assert [o.seq for o in overdue] == [0]
        # A worker's heartbeat holds number 0, then gives it back.
        holding = [(0, "started", 0.5, 0.2, "qcelery")]
        assert proto.beat(proto.incarnation, "w@h 1", 15.0, holding, []) == 1
        assert proto.beat(proto.incarnation, "w@h 1", 15.0, [], [0]) == 0
        # A hedging stream's run times, and its check for a straggler.
        assert proto.note_runtimes(proto.incarnation, [0.01, 0.02]) == 2
        assert proto.hedge(0, 4.0, 0.0, 2) == (0.01, b"")
        assert proto.publish(0, b"0:r:application/json:utf-8:0") == 1
        assert proto.close() == 2
        batch = proto.pop(0, 0, 10, owner="consumer-1")
        assert len(batch.members) == 2
        proto.pop(2, 2, 10, owner="consumer-1", epoch=batch.epoch, mode="free")
        assert proto.stats().next == 2
        yield proto
    finally:
        redis_client.delete(*StreamKeys(name).all())


def test_every_script_is_run_by_some_operation(recorded: Recording) -> None:
    assert {call[0] for call in recorded.calls} == set(SCRIPTS)


def test_each_header_names_the_keys_protocol_passes_in_order(recorded: Recording) -> None:
    for script in SCRIPTS:
        places = [(int(i), part) for i, part in KEY_LINE.findall(header(script))]
        assert [i for i, _ in places] == list(range(1, len(places) + 1)), (
            f"{script}.lua: its header numbers its KEYS {[i for i, _ in places]}"
        )
        named = [part for _, part in places]
        rest = [int(i) for i in REST_LINE.findall(header(script))]
        assert rest in ([], [len(named) + 1]), f"{script}.lua: its KEYS[n..] line says {rest}"
        prefix = f"co:{{{recorded.keys.name}}}:"
        others = [key.removeprefix(prefix) for key in recorded.keys.all()]
        others = [key for key in others if key not in named]
        for name, keys, _, _ in recorded.calls:
            if name != script:
                continue
            passed = [key.removeprefix(prefix) for key in keys]
            assert passed in ([named, named + others] if rest else [named]), (
                f"{script}.lua's header names KEYS {named}"
                + (" (then the stream's other keys)" if rest else "")
                + f"; protocol.py passes {passed}"
            )


def test_each_header_names_every_argument_protocol_passes(recorded: Recording) -> None:
    for script in SCRIPTS:
        found = ARGV_LINE.findall(header(script))
        fixed = [int(i) for i, more, _ in found if not more]
        assert fixed == list(range(1, len(fixed) + 1)), (
            f"{script}.lua: its header numbers its ARGV {fixed}"
        )
        # A tail such as claim's ARGV[8..7+wanted] follows the fixed ones, as
        # many as the fixed argument it names (here `wanted`) says.
        names = {word: int(i) for i, word in re.findall(r"^-- ARGV\[(\d+)\]\s+(\w+)",
                                                        header(script), re.M)}  # fmt: skip
        tails = [(int(i), int(more), names[word]) for i, more, word in found if more]
        assert all(i == off + 1 == len(fixed) + 1 for i, off, _ in tails), script
        calls = [args for name, _, args, _ in recorded.calls if name == script]
        assert calls, f"no operation ran {script}.lua"
        for args in calls:
            expected = len(fixed) + sum(int(args[place - 1]) for _, _, place in tails)
            assert len(args) == expected, (
                f"{script}.lua's header names {expected} ARGV; protocol.py passes {len(args)}"
            )


def test_scripts_use_only_the_keys_and_arguments_their_header_names() -> None:
    for script in SCRIPTS:
        body = code(file_text(script))
        keys = len(KEY_LINE.findall(header(script)))
        used = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", body)}
        assert used <= set(range(1, keys + 1)), f"{script}.lua uses KEYS {sorted(used)}"
        argv = {int(i) for i, more, _ in ARGV_LINE.findall(header(script)) if not more}
        used = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", body)}
        assert used <= argv, f"{script}.lua uses ARGV {sorted(used)}; its header: {sorted(argv)}"


def test_only_reads_and_harmless_writes_skip_waiting_for_replicas(recorded: Recording) -> None:
    # reclaim writes, but a failover that takes it back only makes numbers come
    # due again; a heartbeat lost to a failover is made again by the next beat,
    # a run time lost changes nothing, a backup mark lost at worst lets a second
    # backup go; attaching (open with create=False and no window) writes nothing
    # worth waiting for.
    not_waited = {(name, args[4] if name == "window" else "") for name, _, args, durable
                  in recorded.calls if not durable}  # fmt: skip
    assert not_waited == {
        ("stats", ""), ("reclaim", ""), ("window", "attach"), ("lease", ""), ("timing", ""),
        ("hedge", ""),
    }  # fmt: skip


def test_every_script_is_loaded_behind_the_prelude() -> None:
    prelude = file_text(PRELUDE)
    assert "KEYS" not in code(prelude)
    assert "ARGV" not in code(prelude)
    defined = re.findall(r"^local function (\w+)\(", prelude, re.M)
    for script in SCRIPTS:
        source = script_source(script)
        body = file_text(script)
        assert source.endswith(body)
        given = re.findall(r"^local function (\w+)\(", source[: -len(body)], re.M)
        # Every prelude function the script calls, in the prelude's order, and
        # no other: Redis makes each one anew on every call.
        called = {fn for fn in defined if re.search(rf"\b{fn}\(", code(body))}
        assert called <= set(given), f"{script}.lua calls {called - set(given)}, not given"
        assert given == [fn for fn in defined if fn in given]
    assert "now_ms" not in re.findall(r"^local function (\w+)", script_source("publish"), re.M)
    # A function given calls others: they come too (wake() calls expire_new()).
    assert "local function expire_new(" in script_source("publish")
    with pytest.raises(ValueError, match="no Lua script named 'nope'"):
        script_source("nope")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_clock_wake_tokens_and_expiry_are_written_once_in_the_prelude(script: str) -> None:
    # One idiom each: now_ms() for Redis's clock, wake(key) for a wake token
    # (RPUSH only into an empty list), refresh(ttl, key...) for expiry.
    body = code(file_text(script))
    for command in ("TIME", "RPUSH", "LTRIM", "LLEN", "PEXPIRE"):
        assert f"'{command}'" not in body, (
            f"{script}.lua calls {command} itself: use the prelude's now_ms(), wake(key) "
            "or refresh(ttl, key...)"
        )
    prelude = code(file_text(PRELUDE))
    for function in ("now_ms", "wake", "refresh"):
        assert f"local function {function}(" in prelude


def test_a_wake_token_never_piles_up(redis_client: redis.Redis) -> None:
    # set_window wakes producers as every other script does: one token at most,
    # however often it is called (it used to RPUSH then LTRIM).
    name = f"test-lua-{uuid.uuid4().hex}"
    proto = Protocol(redis_client, name, ttl=60)
    try:
        proto.open(uuid.uuid4().hex, create=True, window=4)
        for window in (5, 6, 7):
            assert proto.set_window(window) == window
        assert redis_client.lrange(proto.keys.space, 0, -1) == [b"1"]
        assert 0 < redis_client.pttl(proto.keys.space) <= 60_000
    finally:
        redis_client.delete(*StreamKeys(name).all())
