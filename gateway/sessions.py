"""Server-side sessions (``gateway.sessions``): the gateway keeps the conversation, a client sends its new turn.

A chat request with a ``session_id`` (HTTP ``x-igw-session-id``) is a turn of the caller's session
(tenant, session id). The worker sees::

    [context of this request] + [the session's system messages] + [earlier turns: messages + answer] +
    [this turn's messages]

and when the turn is done the session gains it: its own messages (the ``task`` as a user message;
``context`` is per request and not stored) and the assistant's answer. System messages are not
turns: the latest a turn sent are the session's system messages, sent first every time and never
trimmed. A turn that is cancelled, fails or is superseded writes nothing: the session stays as it
was before it.

Trimming: the history sent is cut from the oldest turn until history + this turn + ``max_tokens`` fit
the model's context (less ``context_margin_tokens``), the prompt fits ``gateway.limits.max_prompt_bytes``
and the session ``max_session_bytes`` and ``max_turns``. The turns cut are reported in ``started``
(``session_turns_dropped``) and are gone from the session once the turn is done.

Token counts: the gateway has no tokenizer for our workers, so each stored turn keeps the tokens the
worker measured for it: the request's prompt tokens (the worker's count) less the stored counts of the
history sent with it and an estimate of the per-request part (context, system messages), plus its
answer's tokens and a few for the template. Only the new turn's own messages are estimated before the
worker counts them (about 3 bytes per token, as the scheduler does), which the margin covers.

Stores: ``memory`` (this process, LRU within ``memory_max_sessions``) and ``redis`` (shared by all
replicas). In Redis a session is a list of turns (one JSON each) and a hash (``first``: the number of
the oldest turn kept, ``sys``: the system messages), both with the session TTL, in the tenant's hash
slot; a turn is written by one script that drops the turns trimmed by number and appends, so two turns
of one session running at once both land, in the order they finish.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field

import grpc

from gateway.errors import RpcError, clip, invalid_argument, unavailable
from gateway.redis_state import StateUnavailable, call, client, esc
from gateway.v1 import gateway_pb2 as gpb
from gateway.validation import MAX_SESSION_ID_CHARS, ValidRequest, estimate_prompt_tokens
from igw_common.config import Limits, SessionsConfig
from inference.v1 import worker_pb2 as wpb

ANSWER_TEMPLATE_TOKENS = 8  # an assistant message's role markers in a chat template


@dataclass
class Turn:
    messages: list[tuple[str, str]]  # (role, content), no system messages
    answer: str
    tokens: int  # measured share of the prompt, see the module docstring

    @property
    def size(self) -> int:
        return sum(len(c.encode()) for _, c in self.messages) + len(self.answer.encode())

    def encode(self) -> str:
        return json.dumps({"m": self.messages, "a": self.answer, "k": self.tokens}, ensure_ascii=False)

    @classmethod
    def decode(cls, raw) -> Turn:
        d = json.loads(raw)
        return cls([(str(r), str(c)) for r, c in d["m"]], str(d["a"]), int(d["k"]))


@dataclass
class Stored:
    first: int  # the number of turns[0]; turns are numbered from 0 as they are added
    system: list[tuple[str, str]]
    turns: list[Turn]
    expires_in_s: float


@dataclass
class ActiveTurn:
    """A turn being generated: what it sent, and what to write when it is done."""

    tenant: str
    session_id: str
    messages: list[wpb.ChatMessage]  # what the worker sees
    history_turns: int
    dropped: int
    drop_below: int  # turns numbered below this leave the session when this one is written
    own: list[tuple[str, str]]  # this turn's messages to store
    system: list[tuple[str, str]] | None  # new system messages, or None to keep the session's
    history_tokens: int
    fixed_tokens: int  # the estimate of what is sent again each turn (context, system messages)
    answer: list[str] = field(default_factory=list)


def _pairs(messages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


def _chat(pairs) -> list[wpb.ChatMessage]:
    return [wpb.ChatMessage(role=r, content=c) for r, c in pairs]


class MemoryStore:
    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._items: collections.OrderedDict[tuple[str, str], tuple[float, Stored]] = collections.OrderedDict()

    async def load(self, tenant: str, sid: str) -> Stored | None:
        item = self._items.get((tenant, sid))
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._items[(tenant, sid)]
            return None
        self._items.move_to_end((tenant, sid))
        s = item[1]
        return Stored(s.first, list(s.system), list(s.turns), item[0] - time.monotonic())

    async def append(self, tenant, sid, drop_below, turn, system, ttl_s, max_turns) -> None:
        item = self._items.get((tenant, sid))
        s = item[1] if item is not None and item[0] > time.monotonic() else Stored(0, [], [], 0)
        drop = max(0, drop_below - s.first)
        turns = s.turns[drop:] + [turn]
        first = s.first + drop
        if len(turns) > max_turns:
            first += len(turns) - max_turns
            turns = turns[-max_turns:]
        self._items[(tenant, sid)] = (
            time.monotonic() + ttl_s,
            Stored(first, system if system is not None else s.system, turns, ttl_s),
        )
        self._items.move_to_end((tenant, sid))
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)

    async def delete(self, tenant: str, sid: str) -> bool:
        item = self._items.pop((tenant, sid), None)
        return item is not None and item[0] > time.monotonic()

    async def close(self) -> None:
        pass


# KEYS: turns list, meta hash. ARGV: drop turns numbered below this, the new turn (JSON), system messages
# (JSON; '' = unchanged), TTL (ms), max turns. Returns the number of the oldest turn kept.
_APPEND = """
local first = tonumber(redis.call('HGET', KEYS[2], 'first') or '0')
local drop = tonumber(ARGV[1]) - first
if drop > 0 then
  redis.call('LTRIM', KEYS[1], drop, -1)
  first = first + drop
end
local len = redis.call('RPUSH', KEYS[1], ARGV[2])
local max = tonumber(ARGV[5])
if len > max then
  redis.call('LTRIM', KEYS[1], len - max, -1)
  first = first + len - max
end
redis.call('HSET', KEYS[2], 'first', first)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'sys', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return first
"""


class RedisStore:
    def __init__(self, url: str, prefix: str, timeout_s: float):
        self._redis = client(url, timeout_s)
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._append = self._redis.register_script(_APPEND)

    def _keys(self, tenant: str, sid: str) -> tuple[str, str]:
        base = f"{self._prefix}{{t:{esc(tenant)}}}:{esc(sid)}"
        return base + ":turns", base + ":meta"

    async def load(self, tenant: str, sid: str) -> Stored | None:
        turns_key, meta_key = self._keys(tenant, sid)

        async def read():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hmget(meta_key, "first", "sys")
            pipe.lrange(turns_key, 0, -1)
            pipe.pttl(turns_key)
            return await pipe.execute()

        (first, sys_raw), raw_turns, pttl = await call("session read", self._timeout_s, read)
        if first is None and not raw_turns:
            return None
        system = [(str(r), str(c)) for r, c in json.loads(sys_raw)] if sys_raw else []
        return Stored(int(first or 0), system, [Turn.decode(t) for t in raw_turns], max(0, pttl) / 1000)

    async def append(self, tenant, sid, drop_below, turn, system, ttl_s, max_turns) -> None:
        turns_key, meta_key = self._keys(tenant, sid)
        sys_json = json.dumps(system, ensure_ascii=False) if system is not None else ""
        args = [drop_below, turn.encode(), sys_json, int(ttl_s * 1000), max_turns]
        await call("session write", self._timeout_s, lambda: self._append(keys=[turns_key, meta_key], args=args))

    async def delete(self, tenant: str, sid: str) -> bool:
        keys = self._keys(tenant, sid)
        return bool(await call("session delete", self._timeout_s, lambda: self._redis.delete(*keys)))

    async def close(self) -> None:
        await self._redis.aclose()


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
        fixed_bytes = sum(len(m.content.encode()) for m in fixed + rest)
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
            history.append(wpb.ChatMessage(role="assistant", content=t.answer))
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
        )

    async def commit(self, turn: ActiveTurn, prompt_tokens: int, completion_tokens: int) -> None:
        """Write the finished turn (raises StateUnavailable: the caller says the session was not saved)."""
        own_tokens = prompt_tokens - turn.history_tokens - turn.fixed_tokens
        if prompt_tokens <= 0 or own_tokens <= 0:  # no count from the worker: estimate
            own_tokens = estimate_prompt_tokens(_chat(turn.own))
        t = Turn(turn.own, "".join(turn.answer), own_tokens + completion_tokens + ANSWER_TEMPLATE_TOKENS)
        await self.store.append(
            turn.tenant, turn.session_id, turn.drop_below, t, turn.system, self.cfg.ttl_s, self.cfg.max_turns
        )

    async def get(self, tenant: str, session_id: str) -> Stored | None:
        return await self.store.load(tenant, session_id)

    async def delete(self, tenant: str, session_id: str) -> bool:
        return await self.store.delete(tenant, session_id)

    async def close(self) -> None:
        await self.store.close()


# --- the RPCs (GetSession, DeleteSession) and HTTP routes over them ----------------------------------


def check_session_id(session_id: str, field: str = "session_id") -> None:
    if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
        raise invalid_argument(field, f"give the session id: 1-{MAX_SESSION_ID_CHARS} characters")


class SessionApi:
    """Read and delete the caller's sessions; ``gateway.service`` and ``gateway.http_api`` are thin over it."""

    def __init__(self, core):
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
        principal = self.core.auth.authenticate(headers)
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
        principal = self.core.auth.authenticate(headers)
        sessions = self._sessions()
        check_session_id(session_id)
        try:
            gone = await sessions.delete(principal.tenant, session_id)
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if not gone:
            raise self._not_found(session_id)


def to_proto(session_id: str, s: Stored):
    return gpb.Session(
        session_id=session_id,
        turns=[
            gpb.SessionTurn(messages=[gpb.ChatMessage(role=r, content=c) for r, c in t.messages], answer=t.answer)
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
            {"messages": [{"role": r, "content": c} for r, c in t.messages], "answer": t.answer} for t in s.turns
        ],
        "expires_in_s": max(0, int(s.expires_in_s)),
    }
