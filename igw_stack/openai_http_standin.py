"""The synthetic engine behind OpenAI's HTTP API (``/v1/chat/completions``, ``/v1/completions`` with SSE):
an ``openai-http`` pool member at token rates no CPU engine reaches, and one that misbehaves on purpose.

It is never the evidence that something works with an OpenAI-compatible server (the e2e tests run
``vllm serve``); it measures the gateway and drives its fault tests. Like ``vllm serve`` it streams one
chunk per engine step (a role chunk first), ``finish_reason`` on the last, then the ``include_usage``
chunk and ``data: [DONE]``; it does not serve ``/version``, so the gateway treats it as a non-vLLM server
and counts tokens itself where usage is missing.

A request whose prompt holds ``misbehave:<fault>`` misbehaves after ``--fault-after`` tokens (the others
beside it do not): ``garbage`` (a line that is not JSON), ``stall`` (nothing more, the connection left
open), ``close`` (the connection dropped), ``no_usage`` (a well-formed stream without the usage chunk),
``error_500`` (HTTP 500 before any chunk). ``GET /load`` says how many streams are open (a closed client
must leave 0).

Run: ``python -m igw_stack.openai_http_standin --listen HOST:PORT [--model NAME] [--tokens-per-s N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

from igw_common.config import SyntheticConfig
from inference.engine import InvalidRequest, Prompt, SamplingSpec
from inference.synthetic_engine import SyntheticEngine

FAULTS = ("none", "garbage", "stall", "close", "no_usage", "error_500")


class Standin:
    def __init__(self, model: str, engine: SyntheticEngine, fault_after: int, api_key: str):
        self.model, self.engine, self.fault_after, self.api_key = model, engine, fault_after, api_key
        self.open_streams = 0
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", lambda r: web.Response())
        app.router.add_get(
            "/load", lambda r: web.json_response({"open_streams": self.open_streams, "served": self.served})
        )
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return not self.api_key or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "invalid api key")
        entry = {"id": self.model, "object": "model", "owned_by": "standin"}
        return web.json_response({"object": "list", "data": [entry]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "invalid api key")
        try:
            body = await request.json()
            fault = next((f for f in FAULTS if f"misbehave:{f}" in json.dumps(body)), "none")
            chat = request.path.endswith("/chat/completions")
            prompt = _prompt(self.engine, body, chat)
            spec = _sampling(body)
        except (ValueError, KeyError, TypeError, InvalidRequest) as err:
            return _error(400, f"bad request: {err}")
        if fault == "error_500":
            return _error(500, "the standin fails on purpose")
        if body.get("model") != self.model:
            return _error(404, f"The model `{str(body.get('model'))[:64]}` does not exist.")
        if prompt.num_tokens + spec.max_tokens > self.engine.max_context_tokens:
            return _error(400, f"This model's maximum context length is {self.engine.max_context_tokens} tokens.")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.open_streams += 1
        self.served += 1
        rid, created = f"chatcmpl-{self.served}", int(time.time())

        def chunk(delta: dict | None, finish=None, usage=None, text=None) -> bytes:
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text or ""
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}
            out["choices"] = [choice] if usage is None else []
            if usage is not None:
                out["usage"] = usage
            return b"data: " + json.dumps(out).encode() + b"\n\n"

        try:
            if chat:
                await resp.write(chunk({"role": "assistant", "content": ""}))
            n, finish = 0, "length"
            async for step in self.engine.generate(rid, prompt, spec):
                n += step.tokens
                if fault in ("garbage", "stall", "close") and n > self.fault_after:
                    await self._misbehave(fault, resp, request)
                    return resp
                delta = {"content": step.text}
                await resp.write(chunk(delta, step.finish_reason, text=step.text))
                finish = step.finish_reason or finish
            if fault != "no_usage" and (body.get("stream_options") or {}).get("include_usage"):
                total = {"prompt_tokens": prompt.num_tokens, "completion_tokens": n}
                total["total_tokens"] = prompt.num_tokens + n
                await resp.write(chunk(None, usage=total))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.open_streams -= 1

    async def _misbehave(self, fault: str, resp: web.StreamResponse, request: web.Request) -> None:
        if fault == "garbage":
            await resp.write(b"data: {this is not json\n\n")
            await _held(request)  # the gateway must give up on its own
        elif fault == "stall":
            await _held(request)
        elif fault == "close":
            request.transport.close()


async def _held(request: web.Request) -> None:
    """Send nothing until the client goes (aiohttp does not cancel a handler whose client left)."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.05)


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}}, status=status
    )


def _prompt(engine: SyntheticEngine, body: dict, chat: bool) -> Prompt:
    if not chat:
        return engine.tokenize(str(body["prompt"]))
    messages = [{"role": m["role"], "content": m.get("content") or ""} for m in body["messages"]]
    return engine.render(messages)


def _sampling(body: dict) -> SamplingSpec:
    if body.get("tools") or body.get("response_format") or body.get("structured_outputs"):
        raise InvalidRequest("tools", "the standin has no tool calls or constrained decoding; use vllm serve")
    stop = body.get("stop") or ()
    return SamplingSpec(
        max_tokens=int(body.get("max_tokens") or 16), stop=(stop,) if isinstance(stop, str) else tuple(stop)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="host:port")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens-per-s", type=float, default=100.0)
    p.add_argument("--max-context-tokens", type=int, default=4096)
    p.add_argument("--fault-after", type=int, default=3, help="tokens sent before the fault")
    p.add_argument("--api-key", default="", help="a bearer token every request must carry")
    args = p.parse_args()
    engine = SyntheticEngine(
        args.model, SyntheticConfig(tokens_per_s=args.tokens_per_s, max_context_tokens=args.max_context_tokens)
    )
    host, port = args.listen.rsplit(":", 1)
    standin = Standin(args.model, engine, args.fault_after, args.api_key)
    web.run_app(standin.app(), host=host, port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
