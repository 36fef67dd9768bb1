"""Our worker's Session stream carried by the native relay (``gateway.native_relay``).

Everything of ``WorkerConnection`` stays: ``Info`` and health come straight from the worker, submits and
cancels are built the same way and the same frames come back. Only the stream is the relay's: the link
sends this connection's messages to the worker in its batches and hands back the worker's frames, each
request's deltas reduced to its first and the rest merged (the relay wrote them to the client).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Protocol

from gateway.errors import clip
from gateway.workers.session_protocol import WorkerConnection
from igw_worker_api.v1 import worker_pb2 as wpb


class SessionCarrier(Protocol):
    """What a relayed connection needs of the relay's link (``gateway.native_relay.link.Link``)."""

    wake: asyncio.Event  # set when a connection has something to send
    attached: asyncio.Event  # set while a relay is attached

    def connect(self, conn: RelayedConnection) -> asyncio.Future[str]: ...

    def bind(self, call_id: int, wire_id: str, worker: str) -> None: ...


# The relay's id of the client call the running request answers (0: not a relay call). Set by
# ``gateway.native_relay.calls`` for the core's work on that call; read when a request is submitted, so
# the relay writes that request's tokens to that call.
CALL_ID: contextvars.ContextVar[int] = contextvars.ContextVar("native_relay_call", default=0)


class RelayedConnection(WorkerConnection):
    """A worker speaking our Session protocol, its Session stream held by the native relay."""

    def __init__(self, *args, link: SessionCarrier, **kwargs):
        super().__init__(*args, **kwargs)
        self.link = link
        self._wake = link.wake  # a submit or cancel wakes the link's writer, which sends every worker's
        self.lost: asyncio.Future[str] | None = None

    async def _carry_session(self, stub) -> str:
        """Has the relay open the Session stream; returns when the relay reports it lost (the worker went
        away, or the relay did), and the reconnect loop fails, retries or resumes what was on it."""
        await self.link.attached.wait()
        lost = self.link.connect(self)
        self._up(" through the native relay")
        return "through the native relay: " + clip(await lost, 200)

    def open(self, stream, claim, job) -> None:
        super().open(stream, claim, job)
        call_id = CALL_ID.get()
        if call_id and stream.wire_id in self.streams:
            self.link.bind(call_id, stream.wire_id, self.address)
            stream.relayed = True

    def relay_lost(self, error: str) -> None:
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(error)

    def next_message(self) -> wpb.GatewayMessage | None:
        """What to send the worker now (None: nothing), for the link's next batch."""
        return self._next_message() if (self._submits or self._cancels) else None

    @property
    def has_more(self) -> bool:
        return bool(self._submits or self._cancels)
