"""Where sessions are kept: ``memory`` (this process, LRU) or ``redis`` (shared by all replicas).

In Redis a session is a list of turns (one JSON each) and a hash (``first``: the number of the oldest
turn kept, ``sys``: the system messages), both with the session TTL, in the tenant's hash slot; a turn
is written by one script (``lua/append.lua``) that drops the turns trimmed by number and appends.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field
from importlib import resources

from gateway.state.redis import call, client, esc

# A stored message: (role, content), or with tool use (role, content, calls, tool_call_id); a call is
# [id, name, arguments JSON text]. No system messages.
Message = tuple


@dataclass
class Turn:
    messages: list[Message]
    answer: str
    tokens: int  # measured share of the prompt, see the module docstring
    calls: list[list[str]] = field(default_factory=list)  # the answer's tool calls: [id, name, arguments]
    # How the answer was made, for reading a turn back as a response (Responses' GET /v1/responses/{id}):
    model: str = ""
    created_at: int = 0  # unix seconds
    usage: tuple[int, int] = (0, 0)  # the worker's (prompt, completion) tokens
    finish_reason: str = ""

    @property
    def size(self) -> int:
        return sum(_message_size(m) for m in self.messages) + len(self.answer.encode()) + _calls_size(self.calls)

    def encode(self) -> str:
        d = {"m": self.messages, "a": self.answer, "k": self.tokens}
        if self.calls:
            d["c"] = self.calls
        if self.model:
            d["x"] = [self.model, self.created_at, *self.usage, self.finish_reason]
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def decode(cls, raw) -> Turn:
        d = json.loads(raw)
        messages = [
            (str(m[0]), str(m[1])) if len(m) == 2 else (str(m[0]), str(m[1]), _calls(m[2]), str(m[3])) for m in d["m"]
        ]
        model, created_at, prompt, completion, finish = d.get("x") or ("", 0, 0, 0, "")  # older turns: none
        return cls(
            messages,
            str(d["a"]),
            int(d["k"]),
            _calls(d.get("c", [])),
            str(model),
            int(created_at),
            (int(prompt), int(completion)),
            str(finish),
        )


def _calls(raw) -> list[list[str]]:
    return [[str(i), str(n), str(a)] for i, n, a in raw]


def _calls_size(calls) -> int:
    return sum(len(i) + len(n) + len(a.encode()) for i, n, a in calls)


def _message_size(m: Message) -> int:
    return len(m[1].encode()) + (_calls_size(m[2]) + len(m[3]) if len(m) > 2 else 0)


@dataclass
class Stored:
    first: int  # the number of turns[0]; turns are numbered from 0 as they are added
    system: list[tuple[str, str]]
    turns: list[Turn]
    expires_in_s: float

    @property
    def next_number(self) -> int:
        """The number the next turn written gets."""
        return self.first + len(self.turns)

    def turn(self, number: int) -> Turn | None:
        """Turn ``number``, or None when it was trimmed or is not written yet."""
        return self.turns[number - self.first] if self.first <= number < self.next_number else None


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

    async def append(self, tenant, sid, drop_below, turn, system, ttl_s, max_turns, number=-1) -> bool:
        item = self._items.get((tenant, sid))
        s = item[1] if item is not None and item[0] > time.monotonic() else Stored(0, [], [], 0)
        if number >= 0 and s.next_number != number:
            return False
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
        return True

    async def delete(self, tenant: str, sid: str) -> bool:
        item = self._items.pop((tenant, sid), None)
        return item is not None and item[0] > time.monotonic()

    async def close(self) -> None:
        pass


class RedisStore:
    def __init__(self, url: str, prefix: str, timeout_s: float):
        self._redis = client(url, timeout_s)
        self._prefix = prefix
        self._timeout_s = timeout_s
        lua = resources.files("gateway.state.sessions").joinpath("lua")  # package resources: a wheel works too
        self._append = self._redis.register_script(lua.joinpath("append.lua").read_text())

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

    async def append(self, tenant, sid, drop_below, turn, system, ttl_s, max_turns, number=-1) -> bool:
        turns_key, meta_key = self._keys(tenant, sid)
        sys_json = json.dumps(system, ensure_ascii=False) if system is not None else ""
        args = [drop_below, turn.encode(), sys_json, int(ttl_s * 1000), max_turns, number]
        first = await call(
            "session write", self._timeout_s, lambda: self._append(keys=[turns_key, meta_key], args=args)
        )
        return int(first) >= 0

    async def delete(self, tenant: str, sid: str) -> bool:
        keys = self._keys(tenant, sid)
        return bool(await call("session delete", self._timeout_s, lambda: self._redis.delete(*keys)))

    async def close(self) -> None:
        await self._redis.aclose()
