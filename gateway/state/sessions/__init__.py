"""Server-side sessions: the gateway keeps the conversation, a client sends its new turn.

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

Continuing a given turn (``session_follows``: the Responses API's ``previous_response_id``): only the
session's latest turn can be continued (no branches), and the new turn is written only as the number it
was given at the start; if another turn took that number meanwhile, this one is refused
(``TurnConflict``), so a response id never names two different turns. A turn with ``session_store``
false reads the history and writes nothing (Responses' ``store: false``).
"""

from gateway.state.sessions.history import ActiveTurn, Sessions, TurnConflict, TurnMissing, TurnNotLatest
from gateway.state.sessions.store import MemoryStore, RedisStore, Stored, Turn

__all__ = [
    "ActiveTurn",
    "MemoryStore",
    "RedisStore",
    "Sessions",
    "Stored",
    "Turn",
    "TurnConflict",
    "TurnMissing",
    "TurnNotLatest",
]
