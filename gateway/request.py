"""The neutral request every door hands the core, before and after validation.

A door reads its own wire format (protobuf ``ExecuteRequest``, an OpenAI JSON body, a stored job) into
a ``RequestDraft``: the client's values in the core's vocabulary, with only the checks the wire format
itself needs (JSON types, enum numbers, role aliases). ``gateway.core.validation.validate`` checks the
draft against ``gateway.limits`` once, for every door, and returns a ``ValidRequest``. Both are frozen:
a step that changes a request (a session's history around a turn, a job's batch priority) makes a new
value with ``dataclasses.replace``.

Field names in errors are the core's (``messages[2].content``, ``sampling.max_tokens``); a door maps
them to its own with ``gateway.errors.RpcError.renamed``.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import struct_pb2

from igw_worker_api.v1 import worker_pb2 as wpb

MAX_SESSION_ID_CHARS = 128
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice")
TOOL_CHOICES = ("auto", "none", "required", "named")
# The words a template (or igw_common.tool_calls' fallback) writes around the tools: a bound, for quotas.
TOOL_PROMPT_BYTES = 1_024


@dataclass(frozen=True, slots=True)
class Constraint:
    """Structured output as a door read it: ``kind`` is one of ``CONSTRAINT_KINDS``; ``value`` is the
    schema as JSON text, True, the regular expression, or the tuple of choices."""

    kind: str
    value: str | bool | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The functions a model may call and how: ``choice`` is one of ``TOOL_CHOICES`` ("named": exactly the
    tool ``name``); ``parallel`` False = at most one call per answer. Each tool's ``parameters_json_schema``
    is JSON text (checked and made compact by the validator)."""

    tools: tuple[wpb.Tool, ...]
    choice: str = "auto"
    name: str = ""
    parallel: bool = True


@dataclass(frozen=True, slots=True)
class RequestDraft:
    """What a client asked for, as its door read it; nothing here is checked against the limits yet."""

    request_id: str = ""  # the client's label; "" = the gateway makes one
    model: str = ""  # "" = the default model
    messages: tuple[wpb.ChatMessage, ...] = ()  # chat history, roles in the core's names
    task: str = ""  # Execute's task: one more user turn after the messages
    context: struct_pb2.Struct | None = None  # Execute's context: a leading system message, as JSON
    prompt: str | None = None  # a raw prompt (text completions, no chat template); None = a chat request
    suffix: str = ""  # fill-in-the-middle: the text after the cursor
    max_tokens: int | None = None  # None = gateway.limits.default_max_tokens
    # max_tokens is a ceiling (Anthropic's, which Claude Code sets to 32,000): lowered to
    # gateway.limits.max_tokens_limit and to what the context leaves after the prompt, never refused.
    max_tokens_ceiling: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    session_id: str = ""
    session_follows: int = -1  # the session turn this one continues (must be its latest); -1 = no check
    session_store: bool = True  # False: the session's history is read, this turn is not written
    affinity_id: str = ""  # an agent's own conversation id (its session header): worker affinity only
    supersede_key: str = ""
    priority: str | None = None  # "interactive" | "batch"; None = the key's cap
    cache_bypass: bool = False
    stream_interval_ms: int | None = None  # None = gateway.stream_interval_ms
    constraint: Constraint | None = None  # structured output; None = free text
    tools: ToolUse | None = None  # functions the model may call; None = none


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A draft that passed the validator: what the core runs."""

    request_id: str  # the client's label (or one we made): logs and `started` only, never a key
    model: str  # as asked; "" = the default model
    messages: tuple[wpb.ChatMessage, ...]
    sampling: wpb.Sampling
    max_tokens_was_set: bool
    session_id: str = ""
    session_follows: int = -1  # see RequestDraft
    session_store: bool = True
    affinity_id: str = ""  # an agent's conversation id: requests with one go to the same worker (prefix cache)
    priority: str | None = None  # as asked; None = the key's cap
    estimated_prompt_tokens: int = 0  # the scheduler's cost until the worker has tokenized the prompt
    supersede_key: str = ""  # a newer request with this key (same tenant) cancels this one
    prompt: str = ""  # a raw prompt (no chat template) instead of messages: text completions
    suffix: str = ""  # fill-in-the-middle: the text after the cursor (prompt is the text before)
    cache_bypass: bool = False  # neither answered from nor stored in the response cache
    context_messages: int = 0  # leading messages made from `context` (per request: never stored in a session)
    stream_interval_ms: int | None = None  # merge steps into a delta at most this often; None = the default
    constraint: wpb.Constraint | None = None  # checked and normalized (a schema as compact JSON)
    tools: ToolUse | None = None  # checked (schemas compact); None = no tools

    def tools_bytes(self) -> int:
        """What the tools add to the rendered prompt, in UTF-8 bytes (with the fallback prompt's words)."""
        return tools_bytes(self.tools) + (TOOL_PROMPT_BYTES if self.tools is not None else 0)

    def prompt_texts(self) -> tuple[wpb.ChatMessage, ...]:
        """The prompt as messages; a raw prompt counts as one (quota, affinity and the cache key)."""
        return self.messages or (wpb.ChatMessage(role="user", content=self.prompt + self.suffix),)


def estimate_prompt_tokens(messages, tools_bytes: int = 0) -> int:
    """The scheduler's estimate of a prompt's tokens before the worker has tokenized it:
    about 3 bytes of text per token (BPE vocabularies average 3-4 bytes per token on code and
    English, ~3 on CJK) plus the chat template's own tokens. The worker's count replaces it at
    acceptance; quotas reserve an upper bound instead (``gateway.state.quota.prompt_token_bound``)."""
    return sum(message_bytes(m) // 3 + 8 for m in messages) + 16 + tools_bytes // 3


def message_bytes(m: wpb.ChatMessage) -> int:
    """A message's text in UTF-8 bytes: its content and the names and arguments of its tool calls."""
    return len(m.content.encode()) + sum(len(c.name) + len(c.arguments_json.encode()) for c in m.tool_calls)


def tools_bytes(tools: ToolUse | None) -> int:
    """What a request's tools add to its prompt, in UTF-8 bytes (the template writes them out)."""
    if tools is None:
        return 0
    return sum(len(t.name) + len(t.description.encode()) + len(t.parameters_json_schema.encode()) for t in tools.tools)
