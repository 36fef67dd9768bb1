"""What the worker needs from an engine; one adapter per engine implements it.

The worker server only speaks this interface, so everything vLLM-specific
lives in ``inference.vllm_engine`` and the synthetic engine in
``inference.synthetic_engine``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from igw_common.tool_calls import CallDelta, HermesParser, ToolSpec


class InvalidRequest(Exception):
    """A request the engine cannot run as sent; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Structured output: (kind, value) with kind json_schema (JSON text), json_object (True), regex, or
    # choice (a tuple of strings); None = free text.
    constraint: tuple[str, object] | None = None
    # Tools the model may call (their grammar, for a forced choice, is already in ``constraint``).
    tools: ToolSpec | None = None
    fit_context: bool = False  # max_tokens is a ceiling: lowered to what the context leaves


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt, ready for the engine."""

    token_ids: list[int] = field(repr=False)
    # The last this many of token_ids are output another worker generated: the request continues after them.
    resumed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def rendered_tokens(self) -> int:
        """The prompt's own tokens (what usage counts), without resumed output."""
        return len(self.token_ids) - self.resumed_tokens

    def resumed(self, token_ids) -> Prompt:
        """This prompt followed by output already generated, to continue after it."""
        return Prompt(token_ids=[*self.token_ids, *token_ids], resumed_tokens=len(token_ids))


@dataclass(frozen=True)
class Step:
    """What one engine step produced for one request."""

    text: str
    tokens: int
    # "stop" or "length" on the request's last step, else None.
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # the step's tokens, for tool parsers that read them; () = not known
    cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache (set on the first step)


# Fill-in-the-middle token triples (before the prefix, before the suffix, where generation starts) of the
# model families that have them; a prompt is `first + prefix + second + suffix + third`.
FIM_FORMATS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
)


def find_fim_tokens(vocabulary) -> tuple[str, str, str] | None:
    """The first FIM format whose three tokens are all in ``vocabulary`` (a container of token strings)."""
    return next((f for f in FIM_FORMATS if all(t in vocabulary for t in f)), None)


class ToolCallParser(abc.ABC):
    """Reads tool calls out of an output as it grows (``igw_common.tool_calls.HermesParser``'s interface)."""

    called: bool  # a call has begun

    @abc.abstractmethod
    def feed(self, text: str, token_ids: tuple[int, ...] = ()) -> tuple[str, list[CallDelta]]:
        """The content and call pieces the new text completes."""

    @abc.abstractmethod
    def finish(self) -> tuple[str, list[CallDelta]]:
        """What was held back, at the output's end."""


ToolCallParser.register(HermesParser)


class Engine(abc.ABC):
    name: str  # "vllm" or "synthetic"
    model: str
    max_context_tokens: int
    max_batch_tokens: int = 0  # tokens the engine holds at once (KV cache); 0 = unknown
    fim_tokens: tuple[str, str, str] | None = None  # set when the model can fill in the middle
    renders_tools: bool = False  # the chat template renders tools (else igw_common.tool_calls' fallback)
    # Its prefix cache, when the engine reports it (igw_common.kv_blocks; vLLM's KV-cache events): the
    # blocks it holds and a callback for each change. None = not reported.
    kv_blocks = None
    on_kv_changes = None  # set by the service: called with igw_common.kv_blocks.Changes
    tokenizer_path: str = ""  # the model folder, for a gateway on this host to tokenize prompts as we do

    async def start(self) -> None:
        """Load the model; called once before serving."""

    async def close(self) -> None:
        """Release the engine; called once at shutdown."""

    @abc.abstractmethod
    def render(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        """Render chat messages (and the tools, for a template that renders them) with the model's chat
        template and tokenize."""

    def tool_parser(self, spec: ToolSpec) -> ToolCallParser:
        """What reads tool calls out of this model's output."""
        return HermesParser()

    @abc.abstractmethod
    def tokenize(self, text: str) -> Prompt:
        """Tokenize a raw prompt as is (no chat template)."""

    def render_raw(self, prompt: str, suffix: str) -> Prompt:
        """A raw prompt, or with ``suffix`` a fill-in-the-middle prompt in the model's own format."""
        if suffix:
            if self.fim_tokens is None:
                raise InvalidRequest(
                    "suffix",
                    f"model {self.model} has no fill-in-the-middle tokens; send the prompt "
                    "alone, or use a code model that has them",
                )
            first, second, third = self.fim_tokens
            prompt = f"{first}{prompt}{second}{suffix}{third}"
        return self.tokenize(prompt)

    @abc.abstractmethod
    def generate(self, request_id: str, prompt: Prompt, sampling: SamplingSpec) -> AsyncIterator[Step]:
        """Yield one Step per engine step until the request finishes.

        Cancelling the task that iterates must abort the request in the engine
        at once (the worker cancels on client cancel, timeout and session end).
        """

    @abc.abstractmethod
    def unfinished_requests(self) -> int:
        """Requests the engine itself still tracks (waiting or running)."""

    def fit(self, prompt: Prompt, sampling: SamplingSpec) -> SamplingSpec:
        """A ceiling max_tokens (``fit_context``) lowered to what the context leaves after the prompt."""
        room = self.max_context_tokens - prompt.num_tokens
        if sampling.fit_context and 0 < room < sampling.max_tokens:
            return dataclasses.replace(sampling, max_tokens=room)
        return sampling

    def check(self, prompt: Prompt, sampling: SamplingSpec) -> None:
        """Reject what cannot fit the context window, naming the field."""
        if prompt.num_tokens == 0:
            raise InvalidRequest("task", "the rendered prompt is empty")
        if prompt.num_tokens >= self.max_context_tokens:
            raise InvalidRequest(
                "task",
                f"the prompt is {prompt.num_tokens} tokens; model {self.model} takes at most "
                f"{self.max_context_tokens} tokens of prompt and output together",
            )
        if prompt.num_tokens + sampling.max_tokens > self.max_context_tokens:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"prompt ({prompt.num_tokens} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"{self.max_context_tokens}-token context of model {self.model}; lower max_tokens to at most "
                f"{self.max_context_tokens - prompt.num_tokens}",
            )
