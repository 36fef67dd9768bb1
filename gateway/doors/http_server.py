"""The HTTP front door: the OpenAI and Anthropic APIs on ``gateway.http_listen`` (Envoy routes ``/v1/`` here).

    POST /v1/chat/completions   (stream: true -> server-sent events, data: [DONE])
    POST /v1/completions        (suffix -> fill-in-the-middle where the model has the tokens)
    POST /v1/responses          (OpenAI Responses; GET and DELETE /v1/responses/{id}: stored ones)
    POST /v1/messages           (Anthropic Messages; POST /v1/messages/count_tokens)
    GET  /v1/models
    GET  /v1/sessions/{session_id}     (server-side sessions: the caller's stored conversation)
    DELETE /v1/sessions/{session_id}

It is served by the gateway process itself, on the same event loop as the
gRPC door, over the same request core (``gateway.core.request_core``): one queue, one
set of worker sessions, one quota view, so fairness between tenants and
quotas hold across both doors exactly. A sibling process would need its own
queue and worker sessions and could only approximate both.

Headers: ``Authorization: Bearer <API key>`` as for gRPC; ``x-igw-priority``
(interactive | batch), ``x-igw-session-id``, ``x-igw-supersede-key``,
``x-igw-request-id`` (a label) and ``x-igw-timeout-ms`` (a deadline) carry
what ``ExecuteRequest`` fields carry, and ``x-igw-cache: bypass`` skips the
response cache; a response answered from the cache carries ``x-igw-cache: hit``,
and one whose session history was trimmed ``x-igw-session-turns-dropped`` (both
are known at the first event, before the status line goes out). A client that disconnects cancels the
request handler (aiohttp's handler cancellation), which takes the core's one
abort path: the engine drops the request within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import grpc
from aiohttp import web

from gateway.core.events import Done, Started
from gateway.core.request_core import RequestCore
from gateway.core.validation import header_number
from gateway.doors import anthropic_api, openai_api, responses_api
from gateway.doors import sessions as sessions_door
from gateway.errors import RpcError, invalid_argument
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.doors.http_server")

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json_error(err: RpcError, api=openai_api, names: dict[str, str] | None = None) -> web.Response:
    """An error as ``api`` (the module of one HTTP API: openai_api, anthropic_api, ...) writes them."""
    status, body = api.error_body(err, api.NAMES if names is None else names)
    headers = {}
    retry = err.retry_after_s
    for name, value in err.trailers:
        if name == "retry-after":
            headers["Retry-After"] = value
    if "Retry-After" not in headers and retry is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, round(retry)))
    return web.json_response(body, status=status, headers=headers)


_ROUTES = (
    "POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, POST /v1/messages, "
    "POST /v1/messages/count_tokens, "
    "GET /v1/models, GET and DELETE /v1/responses/{response_id}, GET and DELETE /v1/sessions/{session_id}"
)


@web.middleware
async def _openai_errors(request: web.Request, handler):
    """aiohttp answers an unknown path and a wrong method itself, in plain text; OpenAI clients parse a
    JSON error. The client's path and method are not echoed (they are unbounded). (A body over the limit
    is answered by ``_run``, which reads it.)"""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {}
        if exc.status == 404:
            message, code = f"no such route; this API serves {_ROUTES}", "unknown_route"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            headers["Allow"] = allowed
            message, code = f"method not allowed on this route; allowed: {allowed}", "method_not_allowed"
        else:
            message, code = exc.reason, exc.reason.lower().replace(" ", "_")
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return web.json_response(body, status=exc.status, headers=headers)


class HttpApi:
    def __init__(self, cfg: GatewayConfig, core: RequestCore):
        self.cfg = cfg
        self.core = core
        self.serving = True
        self.app = web.Application(client_max_size=cfg.limits.max_request_bytes, middlewares=[_openai_errors])
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        self.app.router.add_post("/v1/responses", self.responses)
        self.app.router.add_get("/v1/responses/{response_id}", self.get_response)
        self.app.router.add_delete("/v1/responses/{response_id}", self.delete_response)
        self.app.router.add_get("/v1/sessions/{session_id}", self.get_session)
        self.app.router.add_delete("/v1/sessions/{session_id}", self.delete_session)
        self.sessions = sessions_door.SessionApi(core)
        self.app.router.add_get("/healthz", self.healthz)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._inflight: set[asyncio.Task] = set()

    # --- process wiring -------------------------------------------------------------------

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        # handler_cancellation: a client that goes away cancels its handler, so its request is aborted.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        await self._site.start()

    async def drain(self, notice_s: float, grace_s: float) -> None:
        """Unhealthy first (Envoy moves new requests elsewhere), then let streams finish, then stop."""
        self.serving = False
        await asyncio.sleep(notice_s)
        if self._site is not None:
            await self._site.stop()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=grace_s)
        if self._runner is not None:
            await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok" if self.serving else "draining", status=200 if self.serving else 503)

    # --- routes -----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai_api.chat_request, openai_api)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai_api.completion_request, openai_api)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, anthropic_api.messages_request, anthropic_api)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, responses_api.responses_request, responses_api)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """An estimate of the prompt's tokens (the worker counts exactly when it runs the request)."""
        headers, names = _headers(request), anthropic_api.NAMES
        try:
            self.core.authenticate(headers)
            body = await _body(request, self.cfg.limits.max_request_bytes)
            draft, names = anthropic_api.count_tokens(body, dict(headers))
            valid = self.core.validate(draft)
        except RpcError as err:
            return _json_error(err, anthropic_api, names)
        return web.json_response(anthropic_api.token_estimate(valid.messages, valid.tools_bytes()))

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.core.authenticate(_headers(request))
        except RpcError as err:
            return _json_error(err)
        return web.json_response(openai_api.models_list(sorted(self.core.workers.models())))

    async def get_session(self, request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        try:
            stored = await self.sessions.get(_headers(request), sid)
        except RpcError as err:
            return _json_error(err)
        return web.json_response(sessions_door.to_json(sid, stored))

    async def delete_session(self, request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        try:
            await self.sessions.delete(_headers(request), sid)
        except RpcError as err:
            return _json_error(err)
        return web.json_response({"object": "session.deleted", "id": sid, "deleted": True})

    async def get_response(self, request: web.Request) -> web.Response:
        """A stored response (a turn of a server-side session) read back."""
        rid = request.match_info["response_id"]
        try:
            _, turn = await self._stored_turn(request, rid)
        except RpcError as err:
            return _json_error(err, responses_api)
        return web.json_response(responses_api.stored_response(rid, turn))

    async def delete_response(self, request: web.Request) -> web.Response:
        """Deletes the conversation a stored response belongs to (sessions store conversations)."""
        rid = request.match_info["response_id"]
        try:
            session_id, _ = await self._stored_turn(request, rid)
            await self.sessions.delete(_headers(request), session_id)
        except RpcError as err:
            return _json_error(err, responses_api)
        return web.json_response({"id": rid, "object": "response", "deleted": True})

    async def _stored_turn(self, request: web.Request, rid: str):
        """(session id, turn) of a stored response this caller has; NOT_FOUND for any other id."""
        headers = _headers(request)
        found = responses_api.parse_response_id(rid)
        if found is None:
            self.core.authenticate(headers)  # an unauthenticated caller learns nothing of the id
            raise responses_api.unknown_response(rid)
        try:
            stored = await self.sessions.get(headers, found[0])  # authenticates
        except RpcError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                raise responses_api.unknown_response(rid) from None
            raise
        turn = stored.turn(found[1])
        if turn is None:
            raise responses_api.unknown_response(rid)
        return found[0], turn

    # --- one completion ---------------------------------------------------------------------

    async def _complete(self, request: web.Request, parse_body, api) -> web.StreamResponse:
        """One request of an API whose module (``api``) reads its bodies (``parse_body``) and writes its
        answers (``api.Answer``) and errors (``api.error_body``)."""
        task = asyncio.current_task()
        self._inflight.add(task)
        try:
            return await self._run(request, parse_body, api)
        finally:
            self._inflight.discard(task)

    async def _run(self, request: web.Request, parse_body, api) -> web.StreamResponse:
        headers = _headers(request)
        try:
            body = await _body(request, self.cfg.limits.max_request_bytes)
        except RpcError as err:
            return _json_error(err, api)
        reading = parse_body(body, dict(headers))
        try:
            deadline = _deadline(dict(headers))
        except RpcError as err:
            return _json_error(err, api, reading.names)
        events = self.core.run(headers, reading.draft, deadline, api.DOOR)
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except RpcError as err:
                return _json_error(err, api, reading.names)
            answer = api.Answer(reading.shape, first)
            if not reading.shape.stream:
                return await self._whole(events, first, answer, api, reading.names)
            return await self._stream(request, events, first, answer, reading.names)

    async def _whole(self, events, first, answer, api, names: dict[str, str]) -> web.Response:
        try:
            ev = first
            while not isinstance(ev, Done):
                answer.add(ev)
                ev = await anext(events)
            return web.json_response(answer.result(ev), headers=_state_headers(first))
        except RpcError as err:
            return _json_error(err, api, names)

    async def _stream(self, request, events, first, answer, names) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **_state_headers(first)})
        await resp.prepare(request)
        ev = first
        try:
            while True:
                for frame in answer.frames(ev):
                    await resp.write(frame)
                if isinstance(ev, Done):
                    break
                ev = await _next_or_keepalive(events, resp, answer, self.cfg.sse_keepalive_ms / 1000)
        except RpcError as err:
            # The status line is gone: the error travels as an event (the SDKs raise it).
            for frame in answer.error_frames(err, names):
                await resp.write(frame)
        await resp.write_eof()
        return resp


async def _next_or_keepalive(events, resp: web.StreamResponse, answer, every_s: float):
    """The next core event; while it is coming, a keep-alive frame (``answer.keepalive``) every ``every_s``
    (gateway.sse_keepalive_ms), so a long prefill does not look like a dead stream."""
    nxt = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=every_s)
            if done:
                return nxt.result()
            await resp.write(answer.keepalive())
    finally:
        if not nxt.done():  # the client went away (or writing failed): the core's abort path runs
            nxt.cancel()
            await asyncio.wait({nxt})  # ... to its end, before the events are closed


async def _body(request: web.Request, limit: int):
    """The request's JSON body; RpcError for one over ``limit``, not JSON, or not representable as text."""
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body is over the limit of {limit} bytes", reason="too_large"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise invalid_argument("body", "not valid JSON") from None
    except RecursionError:  # the JSON decoder's own depth limit
        raise invalid_argument("body", "JSON nested too deeply") from None
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"): valid JSON, but no text protobuf or a
        # log line can carry. Refused here, once for the whole body, before any field is read.
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise invalid_argument("body", "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff); send text") from None
    except RecursionError:
        raise invalid_argument("body", "JSON nested too deeply") from None
    return body


def _state_headers(first) -> dict[str, str]:
    """What the first event says about the response cache and the session's history."""
    out = {}
    if isinstance(first, Started):
        if first.cache_hit:
            out["x-igw-cache"] = "hit"
        if first.session_turns_dropped:
            out["x-igw-session-turns-dropped"] = str(first.session_turns_dropped)
    return out


def _headers(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple((k.lower(), v) for k, v in request.headers.items())


def _deadline(headers: dict[str, str]) -> float | None:
    raw = headers.get("x-igw-timeout-ms")
    if not raw:
        return None
    return asyncio.get_running_loop().time() + header_number(raw, "x-igw-timeout-ms", 1, 2**32 - 1) / 1000
