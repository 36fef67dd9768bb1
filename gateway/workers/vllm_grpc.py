"""A stock vLLM gRPC server as a worker: ``vllm_engine.proto`` (PyPI ``smg-grpc-proto``), nothing of ours on the node.

Behind the same interface as our own worker's connection (``gateway.workers.connection.Connection``), so
scheduling, affinity, health, failover, retry before the first token, drain, quotas and metrics apply
unchanged. What our worker does on its side is done here:

- the tokenizer and chat template come from the model folder (``tokenizer`` of the worker entry, else
  the path the server reports if this host has it, else the server's own ``GetTokenizer`` bundle);
  prompts are rendered and counted here, off the event loop;
- each request is one ``Generate`` stream of token ids, detokenized incrementally (multi-byte
  characters are held until complete) and cut at stop strings (the server stops generating at them,
  the text it would send back is only ids);
- a cancel or deadline cancels the ``Generate`` call and sends ``Abort``, so vLLM drops the request;
- ``GetModelInfo`` gives the model name and context window, ``GetServerInfo`` the scheduler's running
  window (capacity), ``HealthCheck`` (polled) readiness, and ``GetLoads`` the KV-cache capacity in tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import zipfile
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from gateway.errors import clip
from gateway.vocabulary import LENGTH, STOP, TOOL_CALLS
from gateway.workers.connection import CallPerRequest, Claim, Job, WorkerFacts, channel_options
from gateway.workers.streaming import RequestStream
from gateway.workers.tokenization import (
    TOKENIZE_POOL,
    ModelTokenizer,
    StopStrings,
    TemplateError,
    encode_job,
    tool_spec,
)
from igw_common.kv_blocks import Changes, EventFeed
from igw_common.tool_calls import HermesParser, ToolSpec, forced_grammar
from igw_worker_api.v1 import worker_pb2 as wpb

log = logging.getLogger("gateway.workers.vllm_grpc")

_HEALTH_INTERVAL_S = 1.0


class VllmGrpcConnection(CallPerRequest):
    protocol = "vllm-grpc"

    def __init__(
        self,
        address,
        cfg,
        metrics=None,
        pool: str = "default",
        tokenizer: str = "",
        max_concurrent_requests: int = 0,
        kv_events: tuple[str, str] = ("", ""),
    ):
        super().__init__(address, cfg, metrics, pool, tokenizer)
        self.kv_events = kv_events  # the server's KV-event publisher (endpoint, topic), if configured
        self.configured_concurrency = max_concurrent_requests
        self.running_requests = 0  # the server's own count (GetLoads), for operators and tests
        self._stub: vpb_grpc.VllmEngineStub | None = None

    # --- the connection -------------------------------------------------------------------------

    async def _session(self) -> None:
        timeout = self.cfg.worker_connect_timeout_ms / 1000
        async with grpc.aio.insecure_channel(self.address, options=channel_options(self.cfg)) as channel:
            stub = vpb_grpc.VllmEngineStub(channel)
            info = await stub.GetModelInfo(vpb.GetModelInfoRequest(), timeout=timeout, wait_for_ready=True)
            server = await stub.GetServerInfo(vpb.GetServerInfoRequest(), timeout=timeout)
            if self.tokenizer is None:
                self.tokenizer = await self._server_tokenizer(stub, info)
            loads = await self._loads(stub)
            model = info.served_model_name or Path(info.model_path).name
            self.facts = WorkerFacts(
                name=self.address,
                model=model,
                max_context_tokens=info.max_context_length,
                max_concurrent_requests=self.configured_concurrency or server.max_num_seqs or 64,
                max_batch_tokens=max(0, loads.max_total_num_tokens) if loads else 0,
                fill_in_middle=self.tokenizer.fim_tokens is not None,
                engine="vllm-grpc",
            )
            self._stub = stub
            self._established = True
            self._set_ready(True)
            feed = self._follow_kv_events()
            log.info(
                "vLLM gRPC server %s ready: model %s, %d-token context, %d at once",
                self.address,
                model,
                info.max_context_length,
                self.facts.max_concurrent_requests,
            )
            try:
                while True:  # a failed check ends the session; the reconnect loop takes over
                    health = await stub.HealthCheck(vpb.HealthCheckRequest(), timeout=timeout)
                    if not health.healthy:
                        self.last_error = f"the server reports unhealthy: {clip(health.message, 200)}"
                        return
                    loads = await self._loads(stub)
                    if loads is not None:
                        self.running_requests = loads.num_running_reqs + loads.num_waiting_reqs
                    await asyncio.sleep(_HEALTH_INTERVAL_S)
            finally:
                if feed is not None:
                    feed.cancel()
                self._stub = None
                self._set_ready(False)

    def _follow_kv_events(self) -> asyncio.Task | None:
        """Read the server's KV events (vLLM's ZMQ publisher) into ``kv`` while the session lasts. The
        publisher keeps no snapshot: blocks stored before this subscription are learned when stored again."""
        endpoint, topic = self.kv_events
        if not endpoint or self.cfg.placement.strategy != "kv_cache":
            return None

        def changed(changes: Changes) -> None:
            self.kv.block_size = feed.blocks.block_size
            self.kv.apply(changes.cleared, changes.stored, changes.removed)

        feed = EventFeed(endpoint, topic, changed)
        return asyncio.create_task(feed.run(), name=f"kv events {self.address}")

    async def _loads(self, stub) -> vpb.SchedulerLoad | None:
        """The server's load report (rank 0), where its version has GetLoads."""
        try:
            resp = await stub.GetLoads(vpb.GetLoadsRequest(), timeout=self.cfg.worker_connect_timeout_ms / 1000)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise
        return resp.loads[0] if resp.loads else None

    async def _server_tokenizer(self, stub, info: vpb.GetModelInfoResponse) -> ModelTokenizer:
        for candidate in (self.tokenizer_path, info.tokenizer_path, info.model_path):
            if candidate and (Path(candidate) / "tokenizer.json").is_file():
                return await asyncio.to_thread(ModelTokenizer, candidate)
        # Not on this host: the server's own bundle (a zip, streamed).
        data, digest = bytearray(), ""
        async for chunk in stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=60):
            data += chunk.data
            digest = chunk.sha256 or digest
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError("the tokenizer bundle from the server is corrupt (sha256 mismatch)")
        folder = _bundle_dir(digest or hashlib.sha256(data).hexdigest())
        if not (folder / "tokenizer.json").is_file():
            with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
                await asyncio.to_thread(z.extractall, folder)
        return await asyncio.to_thread(ModelTokenizer, folder)

    # --- requests ----------------------------------------------------------------------------------

    def open(self, stream: RequestStream, claim: Claim, job: Job) -> None:
        wire_id = self._register(stream, claim)
        self._calls[wire_id] = asyncio.create_task(self._generate(wire_id, stream, job), name=f"generate {wire_id}")

    def _cancelled(self, wire_id: str) -> None:
        self._abort(wire_id)  # cancelling the Generate call closes the servicer's generator; this tells vLLM too

    def _abort(self, wire_id: str) -> None:
        """Abort on the server too, in case the call's cancel does not reach it (best effort, in the background)."""
        stub = self._stub
        if stub is None:
            return

        async def send():
            try:
                await stub.Abort(vpb.AbortRequest(request_ids=[wire_id]), timeout=5)
            except grpc.aio.AioRpcError as err:
                log.debug("abort of %s on %s failed: %s", wire_id, self.address, err.code().name)

        asyncio.get_running_loop().create_task(send())

    async def _generate(self, wire_id: str, stream: RequestStream, job: Job) -> None:
        loop = asyncio.get_running_loop()
        tok = self.tokenizer
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        spec = tool_spec(job.tools)
        parser = HermesParser() if spec is not None and spec.parses else None
        try:
            try:
                # Placement may have tokenized it already (with this model's tokenizer).
                ids = list(job.prompt_token_ids) or await loop.run_in_executor(
                    TOKENIZE_POOL, encode_job, tok, job, spec
                )
            except TemplateError as err:
                if self._take(wire_id, stream):
                    stream.on_error(invalid, clip(str(err), 300), "suffix" if job.suffix else "messages")
                return
            prompt_tokens = len(ids)
            ids = ids + list(job.resume_token_ids)  # resumed: generation goes on after the output so far
            window, max_tokens = self.max_context_tokens, job.sampling.max_tokens
            if job.sampling.fit_context and 0 < window - len(ids) < max_tokens:
                max_tokens = window - len(ids)  # a ceiling: what the context leaves
            if len(ids) + max_tokens > window:
                field = "task" if len(ids) >= window else "sampling.max_tokens"
                message = (
                    f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                    f"{window}-token context of model {self.model}"
                )
                if self._take(wire_id, stream):
                    stream.on_error(invalid, message, field)
                return
            if not self._mine(wire_id, stream):
                return
            timeout = None if job.deadline is None else max(0.001, job.deadline - loop.time())
            call = self._stub.Generate(_request(wire_id, ids, job, spec, max_tokens), timeout=timeout)
            decoder, stops = tok.decoder(), StopStrings(job.sampling.stop)
            if job.resume_token_ids:
                decoder.feed(job.resume_token_ids)  # its text went out from the first worker
            accepted, cached = False, 0
            async for resp in call:
                if not self._mine(wire_id, stream):
                    call.cancel()
                    return
                if not accepted:  # the server has it (not only our tokenizer): only now is it `started`
                    accepted = True
                    stream.on_accepted(prompt_tokens)
                if resp.HasField("chunk"):
                    cached = max(cached, resp.chunk.cached_tokens)
                    new_ids = resp.chunk.token_ids
                    text = stops.feed(decoder.feed(new_ids))
                    text, calls = parser.feed(text) if parser is not None else (text, ())
                    if text or new_ids or calls:
                        stream.on_delta(text, len(new_ids), calls, new_ids)
                    if stops.stopped:  # the server stops there too; this saves its last step
                        call.cancel()
                        self._abort(wire_id)
                        self._complete(wire_id, stream, STOP, "", (len(ids), cached), parser)
                        return
                elif resp.HasField("complete"):
                    done = resp.complete
                    usage = (len(ids), max(cached, done.cached_tokens))
                    self._complete(wire_id, stream, done.finish_reason, stops.flush(), usage, parser)
                    return
            if self._take(wire_id, stream):
                stream.on_error(grpc.StatusCode.UNAVAILABLE, "the vLLM server ended the stream without finishing it")
        except asyncio.CancelledError:
            raise  # cancelled by cancel(): it has already taken the stream off this worker
        except grpc.aio.AioRpcError as err:
            self._failed(wire_id, stream, err, job)
        except Exception:  # a bug here fails this request, never the connection
            log.exception("vLLM gRPC request %s on %s failed", wire_id, self.address)
            if self._take(wire_id, stream):
                stream.on_error(grpc.StatusCode.INTERNAL, "the gateway failed handling this request's output")
        finally:
            self._calls.pop(wire_id, None)

    def _complete(
        self, wire_id, stream: RequestStream, reason: str, tail: str, prompt: tuple[int, int], parser
    ) -> None:
        """The end: ``prompt`` is (its tokens, of them found in the server's prefix cache)."""
        calls = ()
        if parser is not None:
            tail, calls = parser.feed(tail)
            rest, more = parser.finish()
            tail, calls = tail + rest, [*calls, *more]
        if tail or calls:
            stream.on_delta(tail, 0, calls)
        if not self._take(wire_id, stream):
            return
        if reason in ("abort", "error"):
            code = grpc.StatusCode.ABORTED if reason == "abort" else grpc.StatusCode.UNAVAILABLE
            stream.on_error(code, f"the vLLM server ended the request ({reason}); retrying is safe")
        elif reason == LENGTH:
            stream.on_finished(LENGTH, *prompt)
        else:
            stream.on_finished(TOOL_CALLS if parser is not None and parser.called else STOP, *prompt)

    def _failed(self, wire_id: str, stream: RequestStream, err: grpc.aio.AioRpcError, job: Job) -> None:
        if not self._mine(wire_id, stream):
            return
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._abort(wire_id)
            if self._take(wire_id, stream):
                stream.on_error(code, "the request's deadline passed during generation")
        elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            if self._take(wire_id, stream):
                message = clip(err.details() or "refused by the vLLM server", 300)
                stream.on_error(grpc.StatusCode.INVALID_ARGUMENT, message, _refused_field(message, job))
        else:  # the server or the connection failed: placed again if nothing was sent yet
            self.streams.pop(wire_id, None)
            self._fail(stream)


def _request(wire_id: str, ids: list[int], job: Job, spec: ToolSpec | None, max_tokens: int) -> vpb.GenerateRequest:
    s = job.sampling
    params = vpb.SamplingParams(
        max_tokens=max_tokens,
        stop=list(s.stop),
        skip_special_tokens=True,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
    )
    if s.HasField("temperature"):
        params.temperature = s.temperature
    if s.HasField("seed"):
        params.seed = s.seed % 2**31  # int32 on this wire
    if job.constraint is not None:
        _constrain(params, job.constraint)
    elif spec is not None and (grammar := forced_grammar(spec)) is not None:
        params.grammar = grammar  # Lark with %json: the server's guidance backend compiles it
    return vpb.GenerateRequest(
        request_id=wire_id, tokenized=vpb.TokenizedInput(input_ids=ids), sampling_params=params, stream=True
    )


# What vLLM's messages about a structured-output constraint it cannot compile mention (its server names no
# field): such a refusal names the constraint, any other the prompt.
_CONSTRAINT_WORDS = re.compile(r"schema|grammar|regex|choice|json|structured", re.IGNORECASE)


def _refused_field(message: str, job: Job) -> str:
    if job.constraint is not None and _CONSTRAINT_WORDS.search(message):
        return f"constraint.{job.constraint.WhichOneof('kind')}"
    return "messages"


def _constrain(params: vpb.SamplingParams, c: wpb.Constraint) -> None:
    """Our constraint on vLLM's own wire: the same kinds, in SamplingParams' ``constraint`` oneof."""
    kind = c.WhichOneof("kind")
    if kind == "choice":
        params.choice.CopyFrom(vpb.ChoiceConstraint(choices=c.choice.choices))
    elif kind is not None:
        setattr(params, kind, getattr(c, kind))


def _bundle_dir(digest: str) -> Path:
    import os

    base = os.environ.get("IGW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inference-gateway"
    )
    return Path(base) / "tokenizers" / digest[:32]
