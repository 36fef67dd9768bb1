"""One request's stream between a worker and the client.

The worker connection pushes events into a ``RequestStream``; the Execute
handler pulls them out at the client's pace. Deltas that arrive while the
client is still writing the previous one are merged into one, so a slow
client costs one growing string (bounded by the request's ``max_tokens``),
never an unbounded queue of messages.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc


@dataclass
class Update:
    """What the handler should send next; exactly one group of fields is set."""

    accepted_prompt_tokens: int | None = None
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" when the request is done
    error: tuple[grpc.StatusCode, str, str] | None = None  # (code, message, field)
    retry_from: object | None = None  # the worker failed before the first token: place it again


class RequestStream:
    def __init__(self, request_id: str, model: str, max_tokens: int, cost_tokens: int, retries: int = 0):
        self.request_id = request_id
        self.model = model
        self.max_tokens = max_tokens
        # Tokens this request may occupy on its worker: an upper bound of the
        # prompt + max_tokens until the worker reports the real prompt size.
        self.cost_tokens = cost_tokens
        self.retries_left = retries
        self.worker = None  # the WorkerConnection serving it
        self.worker_name = ""
        self.created = time.monotonic()
        self.dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.itl_samples: list[tuple[float, int]] = []  # (seconds per token, tokens) between deltas
        self.prompt_tokens = 0
        self.completion_tokens = 0  # tokens received from the worker
        self._accepted: int | None = None
        self._text: list[str] = []
        self._tokens = 0
        self._final: Update | None = None
        self._wake = asyncio.Event()
        self.ended = False  # set once the final update has been taken

    # --- worker side ------------------------------------------------------------

    def on_accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.cost_tokens = prompt_tokens + self.max_tokens
        self._accepted = prompt_tokens
        self._wake.set()

    def on_retry(self, failed_worker) -> None:
        """The worker failed before any token: the handler places the request again."""
        self.retries_left -= 1
        self.worker = None
        self._final = Update(retry_from=failed_worker)
        self._wake.set()

    def resume(self) -> None:
        """Back in play after a retry was taken."""
        self._final = None
        self.ended = False

    def on_delta(self, text: str, tokens: int) -> None:
        if tokens:
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            else:
                self.itl_samples.append(((now - self.last_token_at) / tokens, tokens))
            self.last_token_at = now
        self.completion_tokens += tokens
        self._text.append(text)
        self._tokens += tokens
        self._wake.set()

    def on_finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self._finish(Update(finish_reason=finish_reason))

    def on_error(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        self._finish(Update(error=(code, message, field)))

    def _finish(self, update: Update) -> None:
        if self._final is None:
            self._final = update
            self._wake.set()

    @property
    def finished(self) -> bool:
        return self._final is not None

    # --- handler side -------------------------------------------------------------

    async def next(self) -> Update:
        """The next thing to send: acceptance, then merged text, then the end."""
        while True:
            if self._accepted is not None:
                n, self._accepted = self._accepted, None
                return Update(accepted_prompt_tokens=n)
            if self._text:
                text, tokens = "".join(self._text), self._tokens
                self._text, self._tokens = [], 0
                if text or tokens:
                    return Update(text=text, tokens=tokens)
            if self._final is not None:
                self.ended = True
                return self._final
            self._wake.clear()
            await self._wake.wait()

    def ms_since_created(self, at: float | None) -> int:
        return max(0, round(((at if at is not None else time.monotonic()) - self.created) * 1000))
