"""Load for the peer gateway's side of ``make bench``, recorded as ``bench.load`` records it.

SMG (``smg launch``) in front of vLLM gRPC servers speaks OpenAI HTTP/SSE, so
its load is ``/v1/chat/completions`` streams; the same servers measured
"direct" are driven over vLLM's own gRPC contract (``vllm_engine.proto``).
Both record, per request, the send time and the arrival time and token count
of every chunk into ``bench.load.Record``, so ``bench.load.summary`` computes
TTFT, inter-token latency and tokens/s exactly as for our gateway.

How SMG's chunks are counted (measured on smg 1.13.0): one SSE chunk per
engine step that added text, each the text of that step's token; first a
role chunk (``"content": ""``, sent with the first token), last a chunk with
``finish_reason`` and no content, then with ``stream_options.include_usage``
a chunk with ``usage`` and no choices, then ``[DONE]``. A token that adds no
text (the EOS token) or text held back (the start of a possible stop string,
an incomplete UTF-8 character) gives no chunk of its own. So:

- ``usage="final"`` (default): every chunk with content counts one token;
  the final ``usage.completion_tokens`` minus that count (EOS, merged
  tokens) goes to the last chunk. Exact for prompts without stop strings,
  and SMG does no more work than it does for any client asking for usage.
- ``usage="continuous"``: SMG's ``continuous_usage_stats``: every chunk
  carries the cumulative ``completion_tokens``; a chunk counts what it adds.
  Exact always, at some bytes more per chunk for SMG to write.

TTFT is the first chunk that carries a token (the role chunk arrives with
it). A request is ok when its stream ends with a finish reason and
``[DONE]`` on HTTP 200.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc

from bench.load import TASK, Record, Run


def _chat_body(model: str, i: int, max_tokens: int, usage: str, extra: dict | None) -> dict:
    options = {"include_usage": True}
    if usage == "continuous":
        options["continuous_usage_stats"] = True
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"{TASK} ({i})"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": options,
        **(extra or {}),
    }


async def _one_chat(session: aiohttp.ClientSession, url: str, body: dict, rec: Record, usage: str) -> None:
    counted = 0  # tokens put on arrivals so far
    final_usage = None
    finished = done = False
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, SSE comments (keep-alives)
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            now = time.monotonic()
            chunk = json.loads(data)
            if chunk.get("usage"):
                final_usage = chunk["usage"].get("completion_tokens")
            choices = chunk.get("choices") or ()
            if choices and choices[0].get("finish_reason"):
                finished = True
            if usage == "continuous":
                total = (chunk.get("usage") or {}).get("completion_tokens", counted)
                if total > counted and choices:
                    rec.arrivals.append((now, total - counted))
                    counted = total
            elif choices and (choices[0].get("delta") or {}).get("content"):
                rec.arrivals.append((now, 1))
                counted += 1
    if final_usage is not None and final_usage > counted and rec.arrivals:
        t, n = rec.arrivals[-1]
        rec.arrivals[-1] = (t, n + final_usage - counted)
    rec.ok = finished and done


async def openai_chat(
    base_url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    *,
    usage: str = "final",
    extra: dict | None = None,
    timeout_s: float = 600,
) -> Run:
    """``requests`` streamed chat completions to ``base_url`` (``http://host:port``),
    ``concurrency`` at a time, over one keep-alive connection per concurrent client.
    ``extra`` goes into every request body (e.g. ``{"ignore_eos": True}``)."""
    if usage not in ("final", "continuous"):
        raise ValueError(f"usage must be 'final' or 'continuous', not {usage!r}")
    url = base_url.rstrip("/") + "/v1/chat/completions"
    ids = iter(range(requests))
    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client():
            for i in ids:
                body = _chat_body(model, i, max_tokens, usage, extra)
                rec = Record(sent=time.monotonic())
                records.append(rec)
                try:
                    await _one_chat(session, url, body, rec, usage)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    rec.ok = False

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return Run(records, time.monotonic() - t0)


def chat_prompts(model_folder: str, requests: int) -> list[list[int]]:
    """The token ids of the prompts ``openai_chat`` sends, rendered with the model's chat template
    as a gateway in front of a vLLM gRPC server renders them (done before any clock starts)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder)
    out = []
    for i in range(requests):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"{TASK} ({i})"}], tokenize=False, add_generation_prompt=True
        )
        out.append(tok.encode(text, add_special_tokens=False))
    return out


async def direct_vllm_grpc(
    target: str, prompts: list[list[int]], concurrency: int, max_tokens: int, *, ignore_eos: bool = False
) -> Run:
    """One Generate stream per prompt (``chat_prompts``) straight to a vLLM gRPC server
    (stock or synthetic), ``concurrency`` at a time: the "direct" baseline of the peer's runs.
    Each chunk's ``token_ids`` count; the closing ``complete`` repeats the last chunk's ids
    and adds nothing."""
    from smg_grpc_proto import vllm_engine_pb2 as pb
    from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

    todo = iter(enumerate(prompts))
    records: list[Record] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.VllmEngineStub(ch)

        async def client():
            for i, ids in todo:
                rec = Record(sent=time.monotonic())
                records.append(rec)
                req = pb.GenerateRequest(
                    request_id=f"bench-{i}",
                    tokenized=pb.TokenizedInput(input_ids=ids),
                    sampling_params=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                    stream=True,
                )
                try:
                    async for resp in stub.Generate(req, timeout=600):
                        if resp.HasField("chunk"):
                            if resp.chunk.token_ids:
                                rec.arrivals.append((time.monotonic(), len(resp.chunk.token_ids)))
                        else:
                            rec.ok = resp.complete.finish_reason in ("length", "stop")
                except grpc.aio.AioRpcError:
                    rec.ok = False

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return Run(records, time.monotonic() - t0)
