"""What the worker needs from an engine; one adapter per engine implements it.

The worker server only speaks this interface, so everything vLLM-specific
lives in ``inference.vllm_engine`` and the synthetic engine in
``inference.synthetic_engine``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt, ready for the engine."""

    token_ids: list[int] = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Step:
    """What one engine step produced for one request."""

    text: str
    tokens: int
    # "stop" or "length" on the request's last step, else None.
    finish_reason: str | None = None


class Engine(abc.ABC):
    name: str  # "vllm" or "synthetic"
    model: str
    max_context_tokens: int
    max_batch_tokens: int = 0  # tokens the engine holds at once (KV cache); 0 = unknown

    async def start(self) -> None:
        """Load the model; called once before serving."""

    async def close(self) -> None:
        """Release the engine; called once at shutdown."""

    @abc.abstractmethod
    def render(self, messages: list[dict[str, str]]) -> Prompt:
        """Render chat messages with the model's chat template and tokenize."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt: Prompt, sampling: SamplingSpec) -> AsyncIterator[Step]:
        """Yield one Step per engine step until the request finishes.

        Cancelling the task that iterates must abort the request in the engine
        at once (the worker cancels on client cancel, timeout and session end).
        """

    @abc.abstractmethod
    def unfinished_requests(self) -> int:
        """Requests the engine itself still tracks (waiting or running)."""

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
