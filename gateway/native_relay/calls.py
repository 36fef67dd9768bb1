"""Execute calls that reach the gateway through its native relay: the same request core as the gRPC door
(``gateway.doors.grpc_service``), fed the raw request the relay received and answering with replies the
relay writes to the client.

A call's worker deltas are the relay's to write while its request runs on a relayed connection (the
Delta says so); every other event, and a request on another member (vLLM gRPC, OpenAI HTTP), comes back
as a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from gateway.core.events import Delta, Done
from gateway.core.request_core import RequestCore
from gateway.doors import execute_wire
from gateway.doors.grpc_decoding import safe_deserializer
from gateway.errors import RpcError
from gateway.native_relay.link import Link
from gateway.native_relay.v0 import control_pb2 as cpb
from gateway.workers.relayed_session import CALL_ID

log = logging.getLogger("gateway.native_relay")


class RelayCalls:
    def __init__(self, core: RequestCore, link: Link):
        self.core = core
        self.link = link
        self.tasks: dict[int, asyncio.Task] = {}
        self.refusing = False  # draining: new calls go to another replica

    def opened(self, opened: cpb.CallOpened) -> None:
        if self.refusing:
            self.link.reply(
                opened.call_id,
                end=True,
                status_code=grpc.StatusCode.UNAVAILABLE.value[0],
                status_message="this gateway replica is draining; retry",
            )
            return
        self.tasks[opened.call_id] = asyncio.create_task(self._run(opened))

    def closed(self, call_id: int) -> None:
        """The client went away: the core's work on the call stops (and the worker is told)."""
        task = self.tasks.pop(call_id, None)
        if task is not None:
            task.cancel()

    def abandon_all(self) -> None:
        """The relay is gone, and every client call it held with it."""
        for call_id in list(self.tasks):
            self.closed(call_id)

    async def wait_idle(self, timeout_s: float) -> None:
        """Until no call is open (a drain's grace), at most ``timeout_s``."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout_s)

    async def _run(self, opened: cpb.CallOpened) -> None:
        call_id = opened.call_id
        CALL_ID.set(call_id)
        link = self.link
        deadline = asyncio.get_running_loop().time() + opened.timeout_ms / 1000 if opened.timeout_ms else None
        reading = execute_wire.reading(safe_deserializer(opened.request))
        try:
            events = self.core.run(tuple(opened.metadata.items()), reading, deadline, "grpc")
            async with contextlib.aclosing(events):
                async for ev in events:
                    if isinstance(ev, Delta) and ev.relayed:
                        continue  # the relay wrote it
                    done = isinstance(ev, Done)
                    link.reply(call_id, response=execute_wire.response(ev).SerializeToString(), end=done)
                    if done:
                        return
        except RpcError as err:
            status = err.to_status()
            trailing = dict(status.trailing_metadata)
            link.reply(
                call_id,
                end=True,
                status_code=status.code.value[0],
                status_message=status.details,
                status_details=trailing.get("grpc-status-details-bin", b""),
                trailers=[cpb.Trailer(key=k, value=v) for k, v in status.trailing_metadata if not k.endswith("-bin")],
            )
        except asyncio.CancelledError:
            pass  # the client went away: the core's generator was closed, the worker told
        except Exception:  # a bug fails this call alone, with a status, never a hung stream
            log.exception("native relay: call %d failed", call_id)
            link.reply(
                call_id,
                end=True,
                status_code=grpc.StatusCode.INTERNAL.value[0],
                status_message="the gateway failed handling this request",
            )
        finally:
            self.tasks.pop(call_id, None)
