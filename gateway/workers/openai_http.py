"""Any OpenAI-compatible HTTP server as a worker (``protocol: openai-http``): ``vllm serve``, SGLang,
llama.cpp's server, Ollama, or a cloud provider's endpoint.

Behind the same interface as our own worker's connection (``gateway.workers.connection.Connection``), so
scheduling, placement, quotas, fairness, supersession, retry before the first token, drain and metrics
apply unchanged. The server renders the chat template and parses tool calls itself; the gateway sends the
request as OpenAI's JSON and reads OpenAI's SSE chunks back:

- ``GET {base}/models`` at connect gives the model (``served_model`` overrides) and, from vLLM, its
  context window (``max_model_len``); polled every ``HEALTH_INTERVAL_S`` as health. A failed poll takes
  the member out of placement until one succeeds; streams already open are the server's and keep going.
- ``GET /version`` answering ``{"version": ...}`` marks vLLM: its per-chunk usage is asked for
  (``continuous_usage_stats``, so the prompt's tokens are known at the first chunk), its extra
  structured-output kinds (regex, choice) are sent, and ``/metrics`` gives its own running count.
- Each request is one ``POST {base}/chat/completions`` (``/completions`` for a raw prompt) with
  ``stream: true`` and ``stream_options.include_usage``. The last chunk's usage is the request's usage;
  a server that sends none is counted by the gateway (one token per content chunk, the prompt by the
  model's tokenizer where the gateway has it, else the estimate).
- Cancel and deadline close the stream: vLLM aborts a request whose client went away.
- The connection pool is the member's own, ``max_concurrent_requests`` streams at most (+2 for polls).
- A member that answers garbage, stalls past ``stall_timeout_ms`` or closes mid-stream fails that
  request alone: retried on another worker if nothing was sent yet, else cut with UNAVAILABLE (these
  members report no token ids, so an answer cannot be resumed elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import clip
from gateway.vocabulary import LENGTH, STOP, TOOL_CALLS
from gateway.workers.connection import CallPerRequest, Claim, Job, WorkerFacts
from gateway.workers.streaming import RequestStream
from gateway.workers.tokenization import TOKENIZE_POOL, ModelTokenizer, encode_job, tool_spec
from igw_common.config import WorkerEndpoint
from igw_common.tool_calls import CallDelta

log = logging.getLogger("gateway.workers.openai_http")

HEALTH_INTERVAL_S = 2.0
DEFAULT_CONCURRENCY = 64
DEFAULT_CONTEXT_TOKENS = 8_192
# One non-stream body (an error, /models) at most; one SSE line is bounded by aiohttp's reader (128 KiB,
# ValueError beyond). A member that sends more is answering garbage.
MAX_BODY_BYTES = 1 << 20
# Text (content and tool-call arguments) per generated token at most, with a floor: more is garbage.
MAX_BYTES_PER_TOKEN = 64
_VLLM_RUNNING = ("vllm:num_requests_running", "vllm:num_requests_waiting")
_FINISH = {"stop": STOP, "length": LENGTH, "tool_calls": TOOL_CALLS, "function_call": TOOL_CALLS}
_TOOL_CHOICE = {"auto": "auto", "none": "none", "required": "required"}


class Garbage(Exception):
    """The member's answer is not OpenAI's stream format."""


def read_api_key(endpoint: WorkerEndpoint) -> str:
    """The bearer token of a member (``api_key_file`` or ``api_key_env``); bad config stops the start."""
    if endpoint.api_key_file:
        try:
            return Path(endpoint.api_key_file).read_text().strip()
        except OSError as err:
            raise SystemExit(
                f"gateway.workers[].api_key_file: cannot read {endpoint.api_key_file}: {err.strerror}"
            ) from None
    if endpoint.api_key_env:
        value = os.environ.get(endpoint.api_key_env, "").strip()
        if not value:
            raise SystemExit(f"gateway.workers[].api_key_env: {endpoint.api_key_env} is not set")
        return value
    return ""


class OpenAIHttpConnection(CallPerRequest):
    protocol = "openai-http"

    def __init__(self, endpoint: WorkerEndpoint, cfg, metrics=None, pool: str = "default"):
        super().__init__(endpoint.address, cfg, metrics, pool, endpoint.tokenizer)
        self.endpoint = endpoint
        self.base = endpoint.address.rstrip("/")
        parts = urlsplit(self.base)
        self.root = f"{parts.scheme}://{parts.netloc}"  # where vLLM serves /version and /metrics
        self._headers = {"Accept": "text/event-stream"}
        if key := read_api_key(endpoint):
            self._headers["Authorization"] = f"Bearer {key}"
        self.served_model = endpoint.served_model
        self.concurrency = endpoint.max_concurrent_requests or DEFAULT_CONCURRENCY
        self.vllm = False
        self.running_requests = 0  # vLLM's own count of requests running and waiting (its /metrics)
        self._http: aiohttp.ClientSession | None = None

    # --- the connection -------------------------------------------------------------------------

    async def _session(self) -> None:
        connect_s = self.cfg.worker_connect_timeout_ms / 1000
        connector = aiohttp.TCPConnector(limit=self.concurrency + 2)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, connect=connect_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers) as http:
            models = await self._models(http)
            self.vllm = await self._is_vllm(http)
            if self.endpoint.tokenizer and self.tokenizer is None:
                self.tokenizer = await asyncio.to_thread(ModelTokenizer, self.endpoint.tokenizer)
            self.facts = self._facts(models)
            self._http = http
            self._established = True
            self._set_ready(True)
            log.info(
                "OpenAI-compatible member %s ready: model %s (sent as %s), %d-token context, %d at once%s",
                self.address,
                self.facts.model,
                self.served_model,
                self.facts.max_context_tokens,
                self.concurrency,
                " (vLLM)" if self.vllm else "",
            )
            try:
                await self._watch(http)
            finally:
                self._http = None
                self._set_ready(False)

    async def _watch(self, http: aiohttp.ClientSession) -> None:
        """Poll health (and vLLM's load) for good. A failed poll takes the member out of placement until one
        succeeds; the streams open on it are independent HTTP requests and go on."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._models(http)
                if self.vllm:
                    self.running_requests = await self._vllm_running(http)
            except (aiohttp.ClientError, TimeoutError, Garbage) as err:
                self.last_error = f"health check failed: {clip(str(err) or type(err).__name__, 200)}"
                if self.ready:
                    log.warning("member %s: %s; no new requests until it answers", self.address, self.last_error)
                    self._set_ready(False)
                continue
            if not self.ready:
                log.info("member %s answers again", self.address)
                self._set_ready(True)

    async def _get_json(self, http: aiohttp.ClientSession, url: str):
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=self.cfg.worker_connect_timeout_ms / 1000)) as r:
            body = await r.content.read(MAX_BODY_BYTES + 1)
            if r.status != 200:
                raise Garbage(f"GET {urlsplit(url).path} answered HTTP {r.status}")
            if len(body) > MAX_BODY_BYTES:
                raise Garbage(f"GET {urlsplit(url).path} answered more than {MAX_BODY_BYTES} bytes")
            try:
                return json.loads(body)
            except ValueError:
                raise Garbage(f"GET {urlsplit(url).path} answered something that is not JSON") from None

    async def _models(self, http: aiohttp.ClientSession) -> dict:
        """The served model's entry of GET /models (the first entry when ``served_model`` is not set)."""
        listing = await self._get_json(http, f"{self.base}/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        entries = (
            [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)] if isinstance(data, list) else []
        )
        if not self.served_model:
            if not entries:
                raise Garbage("GET /models lists no model")
            self.served_model = clip(entries[0]["id"], 256)
        return next((e for e in entries if e["id"] == self.served_model), {})

    async def _is_vllm(self, http: aiohttp.ClientSession) -> bool:
        try:
            version = await self._get_json(http, f"{self.root}/version")
        except (aiohttp.ClientError, TimeoutError, Garbage):
            return False
        return isinstance(version, dict) and isinstance(version.get("version"), str)

    async def _vllm_running(self, http: aiohttp.ClientSession) -> int:
        timeout = aiohttp.ClientTimeout(total=self.cfg.worker_connect_timeout_ms / 1000)
        async with http.get(f"{self.root}/metrics", timeout=timeout) as r:
            text = (await r.content.read(8 * MAX_BODY_BYTES)).decode(errors="replace")
        # Only the two gauges are parsed: vLLM's whole page (histograms per model) would hold the event loop,
        # every stream's, for milliseconds every poll.
        wanted = "\n".join(line for line in text.splitlines() if line.startswith(_VLLM_RUNNING))
        try:
            samples = [s for f in text_string_to_metric_families(wanted) for s in f.samples]
        except ValueError:
            raise Garbage("GET /metrics is not Prometheus text") from None
        return int(sum(s.value for s in samples if s.name in _VLLM_RUNNING))

    def _facts(self, entry: dict) -> WorkerFacts:
        window = self.endpoint.max_context_tokens
        if not window:
            reported = entry.get("max_model_len")
            window = reported if isinstance(reported, int) and reported > 0 else DEFAULT_CONTEXT_TOKENS
        return WorkerFacts(
            name=self.address,
            model=self.endpoint.model or self.served_model,
            max_context_tokens=window,
            max_concurrent_requests=self.concurrency,
            engine="vllm-http" if self.vllm else "openai-http",
        )

    # --- requests ----------------------------------------------------------------------------------

    def open(self, stream: RequestStream, claim: Claim, job: Job) -> None:
        wire_id = self._register(stream, claim)
        self._calls[wire_id] = asyncio.create_task(self._run_one(wire_id, stream, job), name=f"http {wire_id}")

    async def _run_one(self, wire_id: str, stream: RequestStream, job: Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            prompt_tokens = await self._count_prompt(job, stream)
            body, path = self._body(job, prompt_tokens)
            if not self._mine(wire_id, stream):
                return
            if self._http is None:  # went down since it was placed
                self._lost(wire_id, stream)
                return
            async with asyncio.timeout_at(job.deadline):
                await self._exchange(wire_id, stream, path, body, prompt_tokens)
        except asyncio.CancelledError:
            raise  # cancel() took the stream off this member already
        except Refused as err:
            if self._take(wire_id, stream):
                stream.on_error(grpc.StatusCode.INVALID_ARGUMENT, err.message, err.field)
        except TimeoutError:
            if job.deadline is not None and loop.time() >= job.deadline:
                if self._take(wire_id, stream):
                    stream.on_error(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed during generation"
                    )
            else:
                log.warning("member %s stalled: no chunk for %d ms", self.address, self.endpoint.stall_timeout_ms)
                self._lost(wire_id, stream)
        except (aiohttp.ClientError, Garbage, UnicodeDecodeError, ValueError) as err:
            log.warning(
                "member %s failed request %s: %s", self.address, wire_id, clip(str(err) or type(err).__name__, 200)
            )
            self._lost(wire_id, stream)
        except Exception:  # a bug here fails this request, never the member
            log.exception("request %s on member %s failed", wire_id, self.address)
            if self._take(wire_id, stream):
                stream.on_error(grpc.StatusCode.INTERNAL, "the gateway failed handling this request's output")
        finally:
            self._calls.pop(wire_id, None)

    def _lost(self, wire_id: str, stream: RequestStream) -> None:
        """The member failed this request: placed again if nothing was sent yet, else cut (``Connection._fail``)."""
        if self._take(wire_id, stream):
            self._fail(stream)

    async def _count_prompt(self, job: Job, stream: RequestStream) -> int:
        """The prompt's tokens before the server says: counted with the model's tokenizer where the gateway
        has it (placement may have done it), else the scheduler's estimate."""
        if job.prompt_token_ids:
            return len(job.prompt_token_ids)
        if self.tokenizer is not None:
            try:
                ids = await asyncio.get_running_loop().run_in_executor(
                    TOKENIZE_POOL, encode_job, self.tokenizer, job, tool_spec(job.tools)
                )
                return len(ids)
            except Exception:  # the server renders it itself; the estimate will do
                pass
        return stream.claim.prompt_tokens if stream.claim is not None else 0

    def _body(self, job: Job, prompt_tokens: int) -> tuple[dict, str]:
        s = job.sampling
        max_tokens = s.max_tokens
        if s.fit_context and prompt_tokens and 0 < self.max_context_tokens - prompt_tokens < max_tokens:
            max_tokens = self.max_context_tokens - prompt_tokens  # a ceiling: what the context leaves
        body: dict = {"model": self.served_model, "stream": True, "max_tokens": max_tokens}
        body["stream_options"] = {"include_usage": True}
        if self.vllm:
            body["stream_options"]["continuous_usage_stats"] = True
        if s.HasField("temperature"):
            body["temperature"] = s.temperature
        if s.HasField("top_p"):
            body["top_p"] = s.top_p
        if s.stop:
            body["stop"] = list(s.stop)
        if s.HasField("seed"):
            body["seed"] = s.seed
        if job.suffix:
            raise Refused("suffix", "fill-in-the-middle is not available on this model's OpenAI-compatible servers")
        if job.constraint is not None:
            self._constrain(body, job)
        if job.prompt:
            body["prompt"] = job.prompt
            return body, "/completions"
        body["messages"] = [_message(m) for m in job.messages]
        if job.tools is not None:
            spec = tool_spec(job.tools)
            body["tools"] = spec.openai_tools()
            body["tool_choice"] = _TOOL_CHOICE.get(spec.choice) or {"type": "function", "function": {"name": spec.name}}
            if not spec.parallel:
                body["parallel_tool_calls"] = False
        return body, "/chat/completions"

    def _constrain(self, body: dict, job: Job) -> None:
        c = job.constraint
        kind = c.WhichOneof("kind")
        if kind == "json_schema":
            schema = json.loads(c.json_schema)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        elif kind == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif self.vllm:  # vLLM's own extension: the same kinds our workers take
            body["structured_outputs"] = {"regex": c.regex} if kind == "regex" else {"choice": list(c.choice.choices)}
        else:
            raise Refused(
                f"constraint.{kind}",
                f"a {kind} constraint is not available on this model's OpenAI-compatible servers (json_schema and "
                "json_object are)",
            )

    async def _exchange(self, wire_id: str, stream: RequestStream, path: str, body: dict, prompt_tokens: int) -> None:
        stall_s = self.endpoint.stall_timeout_ms / 1000
        async with self._http.post(self.base + path, json=body) as resp:
            if resp.status != 200:
                await self._refusal(resp)
                return
            reader = _Chunks(resp.content, stall_s)
            accepted, counted, usage, finish, called = False, 0, None, None, False
            budget = max(65_536, body["max_tokens"] * MAX_BYTES_PER_TOKEN)
            async for chunk in reader:
                if not self._mine(wire_id, stream):
                    return
                if isinstance(chunk.get("error"), dict):
                    message = chunk["error"].get("message")
                    raise Garbage(f"the server failed mid-stream: {clip(str(message), 200)}")
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                if not accepted:  # the server has it: only now is it `started`
                    accepted = True
                    stream.on_accepted(_int(usage, "prompt_tokens") or prompt_tokens)
                text, calls, reason = _choice(chunk)
                finish = reason or finish
                called = called or bool(calls)
                budget -= len(text.encode()) + sum(len(c.arguments) for c in calls)
                if budget < 0:
                    raise Garbage("the server sent far more text than max_tokens allows")
                # vLLM's per-chunk usage counts exactly; otherwise a chunk with content is one token.
                total = _int(usage, "completion_tokens") if self.vllm and usage else counted + bool(text or calls)
                tokens, counted = max(0, total - counted), max(counted, total)
                if text or calls or tokens:
                    stream.on_delta(text, tokens, calls)
            if finish is None:
                raise Garbage("the stream ended without a finish reason")
            if not self._take(wire_id, stream):
                return
            if usage is not None and (reported := _int(usage, "completion_tokens")) > counted:
                stream.on_delta("", reported - counted)  # tokens that carried no text (e.g. the stop token)
            # A server reporting fewer than the chunks it sent keeps the count the client was sent: usage
            # always equals the deltas' tokens.
            prompt = _int(usage, "prompt_tokens") or stream.prompt_tokens or prompt_tokens
            cached = _int((usage or {}).get("prompt_tokens_details"), "cached_tokens")
            reason = _FINISH.get(finish, STOP)
            # A forced call ends "stop" on OpenAI's and vLLM's servers; one cut by max_tokens stays "length".
            stream.on_finished(TOOL_CALLS if called and reason == STOP else reason, prompt, cached)

    async def _refusal(self, resp: aiohttp.ClientResponse) -> None:
        """A non-200 answer: the request's fault (400, 413, 422) is the client's error; anything else (401,
        404, 429, 5xx) is the member's, and the request goes elsewhere if it can."""
        raw = await resp.content.read(MAX_BODY_BYTES)
        if resp.status in (400, 413, 422):
            try:
                err = json.loads(raw).get("error")
                message = err.get("message") if isinstance(err, dict) else json.loads(raw).get("message")
            except (ValueError, AttributeError):
                message = None
            raise Refused("messages", clip(str(message or f"refused by the model server (HTTP {resp.status})"), 300))
        raise Garbage(f"HTTP {resp.status}")


class Refused(Exception):
    """The request cannot run here as sent: INVALID_ARGUMENT on ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class _Chunks:
    """The JSON objects of an SSE stream, until ``data: [DONE]`` or its end; ``stall_s`` bounds each wait."""

    def __init__(self, content: aiohttp.StreamReader, stall_s: float):
        self.content, self.stall_s, self.done = content, stall_s, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while not self.done:
            line = await asyncio.wait_for(self.content.readuntil(b"\n"), self.stall_s)
            if not line:
                raise Garbage("the connection closed mid-stream")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank lines, comments (":"), event names
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise Garbage("a streamed chunk is not a JSON object")
            return chunk
        raise StopAsyncIteration


def _int(obj, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def _choice(chunk: dict) -> tuple[str, list[CallDelta], str | None]:
    """The first choice's text, tool-call pieces and finish reason (chat or completions chunk)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise Garbage("a streamed chunk has no choices list")
    if not choices:
        return "", [], None  # the usage chunk
    c = choices[0]
    if not isinstance(c, dict):
        raise Garbage("a streamed choice is not an object")
    delta = c.get("delta")
    if isinstance(delta, dict):
        text = delta.get("content") or ""
        calls = [_call(p) for p in delta.get("tool_calls") or ()]
    else:
        text, calls = c.get("text") or "", []
    if not isinstance(text, str):
        raise Garbage("streamed content is not text")
    reason = c.get("finish_reason")
    return text, calls, reason if isinstance(reason, str) else None


def _call(piece) -> CallDelta:
    if not isinstance(piece, dict) or not isinstance(piece.get("index", 0), int):
        raise Garbage("a streamed tool call is malformed")
    fn = piece.get("function") or {}
    fields = (piece.get("id") or "", fn.get("name") or "", fn.get("arguments") or "")
    if not isinstance(fn, dict) or not all(isinstance(f, str) for f in fields):
        raise Garbage("a streamed tool call is malformed")
    index = piece.get("index", 0)
    if not 0 <= index < 1_024 or len(fields[0]) > 128 or len(fields[1]) > 64:
        raise Garbage("a streamed tool call is out of bounds")
    return CallDelta(index, *fields)


def _message(m) -> dict:
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in m.tool_calls
        ]
        if not m.content:
            out["content"] = None
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out
