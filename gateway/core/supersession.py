"""Supersession: a newer request with the same supersede key (same tenant) replaces the one holding it.

The holder is stopped where it is: out of the queue if it waits there, cancelled on its worker (the
engine stops within a step) if it streams, or at its next step if it is between them.
"""

from __future__ import annotations

import grpc

from gateway.core.scheduler import Scheduler
from gateway.errors import SUPERSEDED_MESSAGE


class Superseded(Exception):
    """Set on a queued ticket's grant when a newer request with the same key replaces it."""


class Holder:
    """A request that holds a supersede key: where it is now, so a newer one can stop it there."""

    __slots__ = ("key", "ticket", "stream", "superseded")

    def __init__(self, key: tuple[str, str]):
        self.key, self.ticket, self.stream, self.superseded = key, None, None, False

    def supersede(self, scheduler: Scheduler) -> None:
        self.superseded = True
        stream, ticket = self.stream, self.ticket
        if stream is not None and stream.worker is not None and not stream.finished:
            stream.worker.cancel(stream, "superseded")  # the engine stops within a step; its room is free now
            stream.on_error(grpc.StatusCode.ABORTED, SUPERSEDED_MESSAGE)
        elif ticket is not None and not ticket.granted.done():
            ticket.granted.set_exception(Superseded())
            scheduler.cancel(ticket)
        # Otherwise it is between steps (reserving quota): it sees the flag at the next one.


class Supersession:
    """(tenant, supersede key) -> the request holding it. Entries live as long as their request."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._holders: dict[tuple[str, str], Holder] = {}

    def take(self, tenant: str, key: str) -> Holder:
        """Hold ``key`` for a new request, superseding the one that held it."""
        holder = Holder((tenant, key))
        previous = self._holders.get(holder.key)
        self._holders[holder.key] = holder
        if previous is not None:
            previous.supersede(self.scheduler)
        return holder

    def release(self, holder: Holder) -> None:
        if self._holders.get(holder.key) is holder:
            del self._holders[holder.key]

    def __len__(self) -> int:
        return len(self._holders)
