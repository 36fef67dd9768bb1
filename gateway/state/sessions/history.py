"""A session's turn: the stored history around a new turn (trimmed to fit), and the turn written when done."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.request import ValidRequest, estimate_prompt_tokens, message_bytes
from gateway.state.sessions.store import MemoryStore, Message, RedisStore, Stored, Turn
from igw_common.config import Limits, SessionsConfig
from igw_common.tool_calls import join_calls
from igw_worker_api.v1 import worker_pb2 as wpb

ANSWER_TEMPLATE_TOKENS = 8  # an assistant message's role markers in a chat template


@dataclass
class ActiveTurn:
    """A turn being generated: what it sent, and what to write when it is done."""

    tenant: str
    session_id: str
    messages: list[wpb.ChatMessage]  # what the worker sees
    history_turns: int
    dropped: int
    drop_below: int  # turns numbered below this leave the session when this one is written
    own: list[Message]  # this turn's messages to store
    system: list[Message] | None  # new system messages, or None to keep the session's
    history_tokens: int
    fixed_tokens: int  # the estimate of what is sent again each turn (context, system messages)
    number: int  # the number this turn gets when written
    checked: bool  # written only as that number (it continues a given turn): else refused, not reordered
    model: str = ""
    answer: list[str] = field(default_factory=list)
    calls: list[list[str]] = field(default_factory=list)  # the answer's tool calls: [id, name, arguments]

    def add_calls(self, pieces) -> None:
        """Join the streamed pieces of the answer's tool calls."""
        join_calls(self.calls, pieces)


def _pairs(messages) -> list[Message]:
    out = []
    for m in messages:
        if m.tool_calls or m.tool_call_id:
            calls = [[c.id, c.name, c.arguments_json] for c in m.tool_calls]
            out.append((m.role, m.content, calls, m.tool_call_id))
        else:
            out.append((m.role, m.content))
    return out


def _chat(stored) -> list[wpb.ChatMessage]:
    return [_message(*m) for m in stored]


def _message(role: str, content: str, calls=(), tool_call_id: str = "") -> wpb.ChatMessage:
    return wpb.ChatMessage(
        role=role,
        content=content,
        tool_calls=[wpb.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls],
        tool_call_id=tool_call_id,
    )


class TurnMissing(LookupError):
    """The turn a request continues is not in the session (never written, trimmed, expired or deleted)."""


class TurnNotLatest(ValueError):
    """The turn a request continues is not the session's latest: the conversation went on after it."""


class TurnConflict(ValueError):
    """Another turn was written while this one ran, so it cannot take the number it was given."""


class Sessions:
    def __init__(self, cfg: SessionsConfig, limits: Limits, redis_url: str, metrics):
        self.cfg, self.limits, self.metrics = cfg, limits, metrics
        if cfg.store == "redis":
            self.store = RedisStore(redis_url, cfg.redis_key_prefix, cfg.redis_timeout_ms / 1000)
        else:
            self.store = MemoryStore(cfg.memory_max_sessions)

    def applies(self, valid: ValidRequest) -> bool:
        """Sessions hold chat conversations: a request with a session id and messages (not a raw prompt)."""
        return bool(valid.session_id and valid.messages and not valid.prompt)

    async def begin(self, tenant: str, valid: ValidRequest, window_tokens: int) -> ActiveTurn:
        """The turn's prompt: the stored history (trimmed to fit) around this request's messages.
        Raises StateUnavailable."""
        stored = await self.store.load(tenant, valid.session_id) or Stored(0, [], [], 0)
        if valid.session_follows >= 0:  # it continues that turn: only the latest can be (no branches)
            if stored.turn(valid.session_follows) is None:
                raise TurnMissing()
            if valid.session_follows != stored.next_number - 1:
                raise TurnNotLatest()
        context = list(valid.messages[: valid.context_messages])
        own = valid.messages[valid.context_messages :]
        new_system = [m for m in own if m.role == "system"]
        rest = [m for m in own if m.role != "system"]
        system = new_system or _chat(stored.system)
        fixed = context + system
        fixed_tokens = estimate_prompt_tokens(fixed) if fixed else 0
        budget_tokens = (
            window_tokens
            - valid.sampling.max_tokens
            - estimate_prompt_tokens(fixed + rest)
            - self.cfg.context_margin_tokens
        )
        fixed_bytes = sum(message_bytes(m) for m in fixed + rest)
        budget_bytes = min(self.limits.max_prompt_bytes - fixed_bytes, self.cfg.max_session_bytes)
        keep = stored.turns
        tokens, size = sum(t.tokens for t in keep), sum(t.size for t in keep)
        dropped = 0
        while keep and (tokens > budget_tokens or size > budget_bytes or len(keep) + 1 > self.cfg.max_turns):
            tokens -= keep[0].tokens
            size -= keep[0].size
            keep = keep[1:]
            dropped += 1
        history: list[wpb.ChatMessage] = []
        for t in keep:
            history += _chat(t.messages)
            history.append(_message("assistant", t.answer, t.calls))
        if dropped:
            self.metrics.session_turns_dropped.inc(dropped)
        return ActiveTurn(
            tenant=tenant,
            session_id=valid.session_id,
            messages=context + system + history + rest,
            history_turns=len(keep),
            dropped=dropped,
            drop_below=stored.first + dropped,
            own=_pairs(rest),
            system=_pairs(new_system) if new_system else None,
            history_tokens=tokens,
            fixed_tokens=fixed_tokens,
            number=stored.next_number,
            checked=valid.session_follows >= 0,
        )

    async def commit(self, turn: ActiveTurn, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        """Write the finished turn. Raises StateUnavailable (the caller says the session was not saved) and
        TurnConflict (a checked turn whose number another took meanwhile)."""
        own_tokens = prompt_tokens - turn.history_tokens - turn.fixed_tokens
        if prompt_tokens <= 0 or own_tokens <= 0:  # no count from the worker: estimate
            own_tokens = estimate_prompt_tokens(_chat(turn.own))
        t = Turn(
            turn.own,
            "".join(turn.answer),
            own_tokens + completion_tokens + ANSWER_TEMPLATE_TOKENS,
            turn.calls,
            turn.model,
            int(time.time()),
            (prompt_tokens, completion_tokens),
            finish_reason,
        )
        written = await self.store.append(
            turn.tenant,
            turn.session_id,
            turn.drop_below,
            t,
            turn.system,
            self.cfg.ttl_s,
            self.cfg.max_turns,
            turn.number if turn.checked else -1,
        )
        if not written:
            raise TurnConflict()

    async def get(self, tenant: str, session_id: str) -> Stored | None:
        return await self.store.load(tenant, session_id)

    async def delete(self, tenant: str, session_id: str) -> bool:
        return await self.store.delete(tenant, session_id)

    async def close(self) -> None:
        await self.store.close()
