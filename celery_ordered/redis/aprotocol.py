"""The asyncio twin of :class:`~celery_ordered.redis.protocol.Protocol`.

:class:`AsyncProtocol` performs the same operations on a ``redis.asyncio``
client. It writes none of them again: a :class:`Protocol` shapes each one (the
keys and arguments of its script, how its reply is read, which errors it
raises: its ``*_op`` methods, see :mod:`celery_ordered.steps`) and keeps the
stream's state (its incarnation, each producer's last claim); this class only
awaits the requests they make::

    aprotocol = AsyncProtocol(protocol, async_client)
    batch = await aprotocol.run(protocol.pop_op(ack, start, limit, ...))

Writes that wait for replicas (``ordered_wait_replicas``) are the exception:
``EVALSHA``, a write of the ``mark`` key and ``WAIT`` must go out together on
one connection, which the blocking Protocol does (``_durably``); with
durability on, each such write runs through it in a worker thread
(``asyncio.to_thread``). Blocking waits (``BLPOP``) are never among them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.exceptions import MovedError

from ..steps import Command, Script, Step, arun
from .clients import AsyncClient
from .protocol import Protocol, _scripts

_T = TypeVar("_T")


class AsyncProtocol:
    """The operations of ``protocol``'s stream, awaited on the asyncio ``client``.

    ``client`` must reach the same Redis as ``protocol.client`` (the same URL:
    see :func:`~celery_ordered.redis.clients.async_client_for`). Each request
    is one round trip on a connection of ``client``'s pool; a blocking wait
    holds its connection while it waits, and nothing else: no thread.
    """

    def __init__(self, protocol: Protocol, client: AsyncClient) -> None:
        #: The blocking protocol: it shapes every operation and holds the state.
        self.protocol = protocol
        self.client = client
        self._run = _scripts(client)

    async def run(self, op: Step[_T]) -> _T:
        """Drive one operation of :attr:`protocol` (a ``*_op``) to its result."""
        return await arun(op, self.perform)

    async def perform(self, request: Script | Command) -> Any:
        """Carry out one request of an operation, without blocking the event loop."""
        if isinstance(request, Command):
            return await self._cluster_hint(self.client.execute_command(*request.args))
        if request.durable and self.protocol.durability is not None:
            # EVALSHA + SET mark + WAIT on one connection: the blocking way, in a thread.
            return await asyncio.to_thread(self.protocol.perform, request)
        return await self._cluster_hint(
            self._run[request.name](keys=request.keys, args=request.args)
        )

    async def delete(self) -> int:
        """Remove every key of the stream; returns how many existed."""
        return int(await self._cluster_hint(self.client.delete(*self.protocol.keys.all())))

    async def _cluster_hint(self, reply: Awaitable[_T]) -> _T:
        try:
            return await reply
        except MovedError as exc:  # a cluster client follows these itself
            raise self.protocol.moved(exc) from exc
