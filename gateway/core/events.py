"""What the core tells a door about a request: one ``Started``, ``Delta``s, one ``Done``.

A door maps them to its own wire format; refusals and failures come as ``RpcError`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from igw_common.tool_calls import CallDelta


@dataclass(slots=True)
class Started:
    request_id: str
    model: str
    worker: str
    prompt_tokens: int
    session_history_turns: int = 0  # server-side sessions: earlier turns sent with this one
    session_turns_dropped: int = 0  # ... and the oldest ones trimmed to fit
    cache_hit: bool = False
    session_turn: int = -1  # the number this turn gets in its session when done; -1 = not written to one


@dataclass(slots=True)
class Delta:
    text: str
    tokens: int
    tool_calls: tuple[CallDelta, ...] = ()  # requests with tools: pieces of the calls being made
    relayed: bool = False  # the native relay wrote it to the client already (gateway.native_relay)


@dataclass(slots=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: int
    ttft_ms: int
    total_ms: int
    cost_micros: int = 0  # micro-units of gateway.pricing.currency
    cache_hit: bool = False
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache held


Event = Started | Delta | Done
