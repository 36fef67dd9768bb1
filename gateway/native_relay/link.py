"""The control link between this gateway process and its native relay: one Unix socket, each message a
4-byte little-endian length and a ``RelayUp`` (relay -> core) or ``RelayDown`` (core -> relay),
``protos/gateway/native_relay/v0/control.proto``.

What the core has for the relay (Connect, Bind, the workers' messages, replies to client calls) is
gathered here and sent in one message when the writer wakes; what the relay sends is dispatched: opened
and closed calls to ``calls``, worker frames and lost sessions to the worker connections. One relay at a
time: a second connection is refused while one is attached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.native_relay.v0 import control_pb2 as cpb

if TYPE_CHECKING:
    from gateway.workers.relayed_session import RelayedConnection

log = logging.getLogger("gateway.native_relay")


class Link:
    def __init__(self):
        self.wake = asyncio.Event()
        self.attached = asyncio.Event()
        self.conns: dict[str, RelayedConnection] = {}  # by address, as the relay names the worker
        self._connects: list[cpb.Connect] = []
        self._binds: list[cpb.Bind] = []
        self._replies: list[cpb.Reply] = []
        self._pong = 0  # the relay's last ping, to answer
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Set by NativeRelay: what to do with the relay's calls, and when the relay goes away.
        self.on_opened: Callable[[cpb.CallOpened], None] = lambda opened: None
        self.on_closed: Callable[[int], None] = lambda call_id: None
        self.on_attached: Callable[[], None] = lambda: None
        self.on_detached: Callable[[], None] = lambda: None
        self.on_stats: Callable[[cpb.RelayStats], None] = lambda stats: None

    async def listen(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path)

    async def close(self) -> None:
        """Close the socket: the relay ends any call still open and exits."""
        if self._server is not None:
            self._server.close()
        if self._writer is not None:
            self._writer.close()

    # --- the core's side -------------------------------------------------------------------------

    def connect(self, conn: RelayedConnection) -> asyncio.Future[str]:
        """Ask the relay for a Session stream to ``conn``'s worker; the future is set when it is lost."""
        self.conns[conn.address] = conn
        conn.lost = asyncio.get_running_loop().create_future()
        self._connects.append(cpb.Connect(worker=conn.address))
        self.wake.set()
        return conn.lost

    def bind(self, call_id: int, wire_id: str, worker: str) -> None:
        """The request ``wire_id`` (on ``worker``) answers client call ``call_id``: the relay writes its deltas."""
        self._binds.append(cpb.Bind(call_id=call_id, wire_id=wire_id, worker=worker))

    def reply(self, call_id: int, **fields) -> None:
        self._replies.append(cpb.Reply(call_id=call_id, **fields))
        self.wake.set()

    def _take(self) -> cpb.RelayDown | None:
        msg = cpb.RelayDown(connects=self._connects, binds=self._binds, replies=self._replies, pong=self._pong)
        self._connects, self._binds, self._replies, self._pong = [], [], [], 0
        for conn in self.conns.values():
            if (message := conn.next_message()) is not None:
                msg.workers.add(worker=conn.address).message.CopyFrom(message)
                if conn.has_more:  # more than one message's worth: the rest next time
                    self.wake.set()
        return msg if (msg.connects or msg.binds or msg.replies or msg.workers or msg.pong) else None

    # --- the socket ------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.attached.is_set():
            log.error("native relay: a second relay connected to this gateway's socket; refused")
            writer.close()
            return
        self._writer = writer
        self.attached.set()
        log.info("native relay attached")
        self.on_attached()
        sending = asyncio.create_task(self._send(writer))
        try:
            await self._receive(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            sending.cancel()
            writer.close()
            self._detach()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while (msg := self._take()) is not None:
                    data = msg.SerializeToString()
                    writer.write(len(data).to_bytes(4, "little") + data)
                await writer.drain()
        except ConnectionError:
            pass  # the reader sees the end too

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        while True:
            n = int.from_bytes(await reader.readexactly(4), "little")
            up = cpb.RelayUp.FromString(await reader.readexactly(n))
            try:
                self._dispatch(up)
            except Exception:  # one bad message must not end the link every call shares
                log.exception("native relay: a control message could not be handled")

    def _dispatch(self, up: cpb.RelayUp) -> None:
        if up.ping:  # answered by the writer: this loop runs
            self._pong = up.ping
            self.wake.set()
        if up.HasField("stats"):
            self.on_stats(up.stats)
        for opened in up.opened:
            self.on_opened(opened)
        for closed in up.closed:
            self.on_closed(closed.call_id)
        for from_worker in up.frames:  # before `lost`: a lost worker's last tokens come first
            conn = self.conns.get(from_worker.worker)
            if conn is not None:
                conn._on_frame(from_worker.frame)
        for lost in up.lost:
            conn = self.conns.get(lost.worker)
            if conn is not None:
                conn.relay_lost(lost.error)

    def _detach(self) -> None:
        """The relay is gone: so are its calls and every Session stream it held."""
        self.attached.clear()
        self._writer = None
        self._connects, self._binds, self._replies, self._pong = [], [], [], 0
        self.on_detached()
        self.on_stats(cpb.RelayStats())  # nothing is held by a relay that is gone
        for conn in self.conns.values():
            conn.relay_lost("the native relay exited")
        log.warning("native relay detached")
