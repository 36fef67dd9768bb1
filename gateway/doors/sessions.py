"""GetSession and DeleteSession (``gateway.doors.grpc_service``) and the HTTP routes over them
(``gateway.doors.http_server``): the caller's stored conversation, read or deleted."""

from __future__ import annotations

import grpc

from gateway.core import validation
from gateway.core.request_core import RequestCore
from gateway.doors.openai_api import calls_json
from gateway.errors import RpcError, clip, invalid_argument, unavailable
from gateway.request import MAX_SESSION_ID_CHARS
from gateway.state.redis import StateUnavailable
from gateway.state.sessions import Sessions, Stored
from gateway.v1 import gateway_pb2 as gpb


def check_session_id(session_id: str, field: str = "session_id") -> None:
    if not session_id:
        raise invalid_argument(field, f"give the session id: 1-{MAX_SESSION_ID_CHARS} characters")
    validation.check_session_id(session_id, field)


class SessionApi:
    """Read and delete the caller's sessions; ``gateway.doors.grpc_service`` and ``gateway.doors.http_server`` are thin over it."""

    def __init__(self, core: RequestCore):
        self.core = core

    def _sessions(self) -> Sessions:
        if self.core.sessions is None:
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                "server-side sessions are off on this gateway (gateway.sessions.enabled)",
                reason="sessions_off",
            )
        return self.core.sessions

    def _unavailable(self, err: StateUnavailable):
        self.core.metrics.state_store_failures.labels("sessions").inc()
        return unavailable("the session store is unreachable; retry shortly", 1.0, reason="session_store")

    @staticmethod
    def _not_found(session_id: str):
        return RpcError(
            grpc.StatusCode.NOT_FOUND,
            f"session_id: no session {clip(session_id)!r} for this caller (unknown, expired or another tenant's)",
            reason="session_not_found",
        )

    async def get(self, headers, session_id: str) -> Stored:
        principal = self.core.authenticate(headers)
        sessions = self._sessions()
        check_session_id(session_id)
        try:
            stored = await sessions.get(principal.tenant, session_id)
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if stored is None:
            raise self._not_found(session_id)
        return stored

    async def delete(self, headers, session_id: str) -> None:
        principal = self.core.authenticate(headers)
        sessions = self._sessions()
        check_session_id(session_id)
        try:
            gone = await sessions.delete(principal.tenant, session_id)
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if not gone:
            raise self._not_found(session_id)


def _call_protos(calls) -> list[gpb.ToolCall]:
    return [gpb.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls]


def _message_proto(m) -> gpb.ChatMessage:
    role, content, *tool = m
    if not tool:
        return gpb.ChatMessage(role=role, content=content)
    return gpb.ChatMessage(role=role, content=content, tool_calls=_call_protos(tool[0]), tool_call_id=tool[1])


def _message_json(m) -> dict:
    role, content, *tool = m
    out = {"role": role, "content": content}
    if tool and tool[0]:
        out["tool_calls"] = calls_json(tool[0])
    if tool and tool[1]:
        out["tool_call_id"] = tool[1]
    return out


def to_proto(session_id: str, s: Stored):
    return gpb.Session(
        session_id=session_id,
        turns=[
            gpb.SessionTurn(
                messages=[_message_proto(m) for m in t.messages],
                answer=t.answer,
                answer_tool_calls=_call_protos(t.calls),
            )
            for t in s.turns
        ],
        expires_in_s=max(0, int(s.expires_in_s)),
        system_messages=[gpb.ChatMessage(role=r, content=c) for r, c in s.system],
    )


def to_json(session_id: str, s: Stored) -> dict:
    return {
        "object": "session",
        "id": session_id,
        "system_messages": [{"role": r, "content": c} for r, c in s.system],
        "turns": [
            {
                "messages": [_message_json(m) for m in t.messages],
                "answer": t.answer,
                **({"answer_tool_calls": calls_json(t.calls)} if t.calls else {}),
            }
            for t in s.turns
        ],
        "expires_in_s": max(0, int(s.expires_in_s)),
    }
