"""Synthetic engine: no model, tokens at a configured rate.

It exists to measure the gateway's own overhead and to drive load and fault
tests fast. It is never evidence that something works with vLLM.

Like a real engine it runs in *steps*: one ticker advances every running
request by one token per step, so a worker using it sends one frame per step
for all requests, as it does with vLLM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from igw_common.config import SyntheticConfig
from inference.engine import Engine, InvalidRequest, Prompt, SamplingSpec, Step


class SyntheticEngine(Engine):
    name = "synthetic"

    def __init__(self, model: str, cfg: SyntheticConfig):
        self.model = model
        self.max_context_tokens = cfg.max_context_tokens
        self.max_batch_tokens = cfg.max_batch_tokens
        if cfg.fill_in_middle:
            self.fim_tokens = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
        self._interval_s = 1.0 / cfg.tokens_per_s
        self._prefill_s = cfg.first_token_delay_ms / 1000
        self._words = cfg.text.split() or ["token"]
        self._active = 0
        self._step: asyncio.Future[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        # One token per whitespace-separated word, plus two per turn for the
        # role markers a chat template would add.
        n = sum(len(m["content"].split()) + 2 for m in messages) + 1
        return Prompt(token_ids=list(range(n)))

    def tokenize(self, text: str) -> Prompt:
        return Prompt(token_ids=list(range(len(text.split()) + 1)))

    def unfinished_requests(self) -> int:
        return self._active

    async def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self._active:
            next_at += self._interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            step, self._step = self._step, loop.create_future()
            if step is not None and not step.done():
                step.set_result(None)
        self._ticker = None

    async def _next_step(self) -> None:
        if self._step is None or self._step.done():
            self._step = asyncio.get_running_loop().create_future()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())
        await asyncio.shield(self._step)

    async def generate(self, request_id: str, prompt: Prompt, sampling: SamplingSpec) -> AsyncIterator[Step]:
        answer = None
        if sampling.tools is not None and sampling.tools.choice in ("required", "named"):
            # A forced call, in three steps (so that its pieces stream): the first allowed tool, no arguments.
            name = sampling.tools.name or sampling.tools.tools[0][0]
            answer = ("<tool_call>\n", json.dumps({"name": name, "arguments": {}})[:-1], "}\n</tool_call>")
        elif sampling.constraint is not None:
            # No model, so no constrained decoding: the two kinds whose answer is known are answered in one
            # step, the others refused, never answered with text that may not match.
            kind, value = sampling.constraint
            if kind not in ("choice", "json_object"):
                raise InvalidRequest(f"constraint.{kind}", "the synthetic engine has no constrained decoding; use vLLM")
            answer = (value[0] if kind == "choice" else "{}",)
        self._active += 1
        try:
            if self._prefill_s:
                await asyncio.sleep(self._prefill_s)
            if answer is not None:
                for i, piece in enumerate(answer):
                    await self._next_step()
                    yield Step(text=piece, tokens=1, finish_reason="stop" if i == len(answer) - 1 else None)
                return
            first = prompt.resumed_tokens  # a resumed request goes on from the word after its output so far
            text = ""
            for i in range(sampling.max_tokens):
                await self._next_step()
                index = (first + i) % len(self._words)
                word = self._words[index] + " "
                # Stop strings work as in vLLM: the output ends before the stop string.
                hit = min(
                    (p for p in (f"{text}{word}".find(s, max(0, len(text) - len(s))) for s in sampling.stop) if p >= 0),
                    default=-1,
                )
                if hit >= 0:
                    yield Step(
                        text=f"{text}{word}"[len(text) : hit], tokens=1, finish_reason="stop", token_ids=(index,)
                    )
                    return
                text += word
                last = i == sampling.max_tokens - 1
                yield Step(text=word, tokens=1, finish_reason="length" if last else None, token_ids=(index,))
        finally:
            self._active -= 1
