"""Redis's own time per task for each of a stream's scripts, on a quiet Redis.

Run from the repository root (see benchmarks/README.md)::

    python benchmarks/redis_time.py [--tasks N] [--window N]

``benchmarks/cost.py`` reads Redis's time while a worker, a producer and
Redis share two cores, where a busy machine also bills Redis for the time it
waited for a core. This script measures the scripts alone: one process drives
a stream as ``map`` does (a claim per half window, a publish per task, the
consumer's pops), on a private ``redis-server`` that nothing else uses, and
reads ``INFO commandstats`` around each script's calls for a block (the
claim, the block's publishes, the pop): the microseconds Redis spent per
task in each script (its inner commands included), and the tasks per second
one Redis core could serve at that cost. It is the arithmetic of
``docs/deploying.md``. (Reading INFO around every single call, as this
script once did, billed each call for the caches that INFO's own work had
just evicted: a busy Redis runs scripts back to back.)

The last rows are floors. First, under any script on this machine: a script
that only returns, called with the keys and arguments of a publish, measured
the same way. It is what one call costs before its first command, whatever
the script does. Then a publish that is not a script: the outcome's ``HSET``
and a wake token's ``RPUSH`` in ``MULTI``/``EXEC``, with none of the checks
the publish script makes (first outcome wins, the incarnation, the number
claimed): what a publish could cost if those checks moved to the consumer's
read and to reclaim. A second table says where each script's time goes: the
commands it calls (commandstats counts a script's inner commands too), and
the rest, which is the call itself, its Lua and the conversion of each inner
call's arguments and reply.

commandstats counts only the time a command runs, not the reading, parsing
and writing around it, nor the system calls of Redis's event loop, which a
node pays for every call whatever the call does. So a second table drives
the node as a fleet does: ``--clients`` processes (8 by default) each run a
stream of their own at once, one round trip per call as a worker makes it,
and ``INFO cpu`` says what Redis's process spent in all, per task. Beside it,
the same clients make one ``INCR`` per task: the cost of the smallest
possible write per task (a plain Celery task's result, say), the floor of
any design in which each task's outcome reaches Redis by a call of its own.
On a machine with fewer cores than clients, Redis shares them, so the share
of a core it was busy is printed too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `celery_ordered` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from celery_ordered.embedded import RedisServer  # noqa: E402
from celery_ordered.redis.protocol import Protocol  # noqa: E402

#: A dispatch record and an outcome of the sizes a small task has.
RECORD = b'q:T:application/json:utf-8:{"task": "proj.tasks.index", "args": [1234], "kwargs": {}}'
OUTCOME = b"%d:R:application/json:utf-8:1234"


def _commandstats(client: redis.Redis) -> dict[str, tuple[int, float]]:
    """Each command's (calls, usec) so far, INFO's own left out."""
    return {
        name.removeprefix("cmdstat_"): (int(value["calls"]), float(value["usec"]))
        for name, value in client.info("commandstats").items()
        if name != "cmdstat_info"
    }


def measure(
    client: redis.Redis, tasks: int, window: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Redis usec per task of each script, driving one stream as ``map`` does.

    Also returns, per script, the usec per task of each command it ran inside
    (``evalsha`` is the whole script, those commands included).
    """
    proto = Protocol(client, f"bench-{uuid.uuid4().hex[:8]}", ttl=86400)
    proto.open(uuid.uuid4().hex, create=True, window=window)
    inner: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[str, int] = defaultdict(int)
    owner, epoch, delivered = "bench", 0, 0
    client.config_resetstat()
    last = _commandstats(client)

    def account(script: str, count: int = 1) -> None:
        nonlocal last
        now = _commandstats(client)
        for command, (_, usec) in now.items():
            inner[script][command] += usec - last.get(command, (0, 0.0))[1]
        calls[script] += count
        last = now

    # A script that only returns, with a publish's keys and arguments: the floor.
    floor = client.register_script("return 1")
    floor_keys = [f"{{{proto.keys.name}}}:floor:{i}" for i in range(11)]
    # A publish of plain commands, no script: the outcome and a wake token, in
    # MULTI/EXEC (no check at all: what a publish could cost if the checks
    # moved to the consumer's read and to reclaim).
    plain_keys = [f"{{{proto.keys.name}}}:plain:results", f"{{{proto.keys.name}}}:plain:ready"]
    while delivered < tasks:
        block = min(window // 2 or 1, tasks - delivered)
        claim = proto.claim(
            [RECORD] * block, window, producer="p", claim_id=uuid.uuid4().hex, lost_after=3600
        )
        account("claim")
        for n in range(claim.first, claim.first + claim.count):
            proto.publish(n, OUTCOME % n)
        account("publish", claim.count)
        batch = proto.pop(
            delivered if epoch else -1, delivered, 256, owner=owner, epoch=epoch, lease=30
        )
        account("pop")
        for n in range(claim.first, claim.first + claim.count):
            floor(keys=floor_keys, args=[n, OUTCOME % n, 86_400_000, "0" * 32])
        account("floor", claim.count)
        for n in range(claim.first, claim.first + claim.count):
            plain = client.pipeline(transaction=True)
            plain.hset(plain_keys[0], n, OUTCOME % n)
            plain.rpush(plain_keys[1], 1)
            plain.execute()
        client.delete(*plain_keys)  # as a consumer's read would empty them
        account("plain", claim.count)
        epoch = batch.epoch
        delivered += len(batch.members)
    proto.delete()
    usec = {script: commands["evalsha"] / tasks for script, commands in inner.items()}
    usec["calls per task"] = (sum(calls.values()) - calls["floor"] - calls["plain"]) / tasks
    usec["floor per call"] = inner["floor"]["evalsha"] / calls["floor"]
    # EXEC's time includes its commands' (counted under their names too).
    usec["plain per call"] = (inner["plain"]["exec"] + inner["plain"]["multi"]) / calls["plain"]
    breakdown = {
        script: {command: total / tasks for command, total in commands.items() if total > 0}
        for script, commands in inner.items()
        if script not in ("floor", "plain")
    }
    return usec, breakdown


def _drive_stream(url: str, tasks: int, window: int, ready: Any, start: Any) -> None:
    """One client of :func:`busy`: a stream driven as ``map`` and its workers drive it."""
    client = redis.Redis.from_url(url)
    proto = Protocol(client, f"bench-{uuid.uuid4().hex[:8]}", ttl=86400)
    proto.open(uuid.uuid4().hex, create=True, window=window)
    ready.wait()
    start.wait()
    delivered, epoch = 0, 0
    while delivered < tasks:
        block = min(window // 2 or 1, tasks - delivered)
        claim = proto.claim(
            [RECORD] * block, window, producer="p", claim_id=uuid.uuid4().hex, lost_after=3600
        )
        for n in range(claim.first, claim.first + claim.count):
            proto.publish(n, OUTCOME % n)  # one round trip each, as each worker's
        batch = proto.pop(
            delivered if epoch else -1, delivered, 256, owner="bench", epoch=epoch, lease=30
        )
        epoch = batch.epoch
        delivered += len(batch.members)
    proto.delete()
    client.close()


def _drive_incr(url: str, tasks: int, window: int, ready: Any, start: Any) -> None:
    """One client of :func:`busy`'s baseline: one ``INCR`` per task, one round trip each."""
    client = redis.Redis.from_url(url)
    key = f"bench-{uuid.uuid4().hex[:8]}"
    client.ping()  # connected before the clock starts, as a stream's client is
    ready.wait()
    start.wait()
    for _ in range(tasks):
        client.incr(key)
    client.delete(key)
    client.close()


def busy(url: str, drive: Any, clients: int, tasks: int, window: int) -> dict[str, float]:
    """Redis's own CPU per task while ``clients`` processes each ``drive`` ``tasks`` at once."""
    client = redis.Redis.from_url(url)
    # Every client has connected (and opened its stream) before the clock starts.
    ready, start = multiprocessing.Barrier(clients + 1), multiprocessing.Event()
    procs = [
        multiprocessing.Process(target=drive, args=(url, tasks, window, ready, start))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    try:
        ready.wait(timeout=60)
        client.config_resetstat()
        before = client.info("cpu")
        began = time.perf_counter()
        start.set()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"a client of the busy run failed (exit code {proc.exitcode})")
        elapsed = time.perf_counter() - began
        after = client.info("cpu")
        stats = client.info("commandstats")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    used = sum(after[k] - before[k] for k in ("used_cpu_user", "used_cpu_sys"))
    total = clients * tasks
    inside = sum(
        value["usec"]
        for key, value in stats.items()
        if key not in ("cmdstat_config|resetstat", "cmdstat_info")
    )
    client.close()
    return {
        "cpu": used * 1e6 / total,
        "commandstats": inside / total,
        "busy": used / elapsed,
        "rate": total / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8, help="processes of the busy run")
    parser.add_argument("--busy-tasks", type=int, default=4000, help="tasks per busy client")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        version = client.info("server")["redis_version"]
        measure(client, 2_000, args.window)  # warm up: scripts loaded, memory touched
        usec, breakdown = measure(client, args.tasks, args.window)
        client.close()
        loads = {
            "stream": busy(server.url, _drive_stream, args.clients, args.busy_tasks, args.window),
            "incr": busy(server.url, _drive_incr, args.clients, args.busy_tasks, args.window),
        }
    finally:
        server.stop()
    total = sum(usec.get(script, 0.0) for script in ("claim", "publish", "pop"))
    print(
        f"redis-server {version}, {args.tasks:,} tasks, window {args.window} "
        "(claims per half window, as map does)\n"
    )
    print("| script | Redis usec per task |")
    print("| --- | --- |")
    for script in ("claim", "publish", "pop"):
        print(f"| {script} | {usec.get(script, 0.0):.2f} |")
    print(f"| all | {total:.2f} |")
    print(f"| floor: a script that only returns, with a publish's keys and arguments, "
          f"per call | {usec['floor per call']:.2f} |")  # fmt: skip
    print(f"| a publish of plain commands, no script (MULTI, HSET, RPUSH, EXEC; no checks), "
          f"per call | {usec['plain per call']:.2f} |")  # fmt: skip
    print(
        f"\nOne Redis core at this cost: about {1e6 / total:,.0f} stream tasks/s "
        f"({usec['calls per task']:.2f} script calls per task), counting only the "
        "time the scripts run."
    )
    print(
        "\nWhere each script's time goes, usec per task: the commands it calls, and the "
        "rest (running its Lua, converting each call's arguments and reply, the call "
        "itself)\n"
    )
    print("| script | its commands | the rest | costliest commands |")
    print("| --- | --- | --- | --- |")
    for script in ("claim", "publish", "pop"):
        commands = {c: u for c, u in breakdown.get(script, {}).items() if c != "evalsha"}
        costliest = sorted(commands.items(), key=lambda item: -item[1])[:4]
        inside = sum(commands.values())
        print(
            f"| {script} | {inside:.2f} | {usec.get(script, 0.0) - inside:.2f} | "
            + ", ".join(f"{command.upper()} {spent:.2f}" for command, spent in costliest)
            + " |"
        )
    stream, incr = loads["stream"], loads["incr"]
    print(
        f"\nA busy node: {args.clients} clients at once, {args.busy_tasks:,} tasks each, "
        "one round trip per call\n"
    )
    print("| per task | stream (claim, publish, pop) | one INCR (the floor) |")
    print("| --- | --- | --- |")
    print(f"| Redis CPU, usec (INFO cpu: commands, parsing, system calls) "
          f"| {stream['cpu']:.1f} | {incr['cpu']:.1f} |")  # fmt: skip
    print(f"| commandstats, usec (the commands alone) "
          f"| {stream['commandstats']:.1f} | {incr['commandstats']:.2f} |")  # fmt: skip
    print(f"| tasks/s reached ({stream['busy']:.0%} and {incr['busy']:.0%} of a core busy) "
          f"| {stream['rate']:,.0f} | {incr['rate']:,.0f} |")  # fmt: skip
    print(f"| tasks/s one Redis core serves at this CPU "
          f"| {1e6 / stream['cpu']:,.0f} | {1e6 / incr['cpu']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
