"""``make bench``: a real ``vllm serve`` (CPU, embedded model) straight, through our gateway (its member of
``protocol: openai-http``, called on the gateway's OpenAI door) and through the peer gateway SMG (an HTTP
worker), same run, same client (``bench.peer.openai_chat``: streamed chat completions, usage from the
final chunk), paths interleaved round by round.

Per path and concurrency: output tokens/s, TTFT p50/p99, and CPU seconds per 1,000 tokens, of the proxy
(our gateway; SMG) and of the vLLM server. The ratios are against straight-to-vLLM, measured in the same
run, because these machines are shared and noisy.

    python -m bench.openai_http [--concurrency 1 8] [--requests 8] [--max-tokens 64] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import psutil
import yaml

from bench import load, peer
from bench.run import ProcSampler
from igw_stack import launcher as stack

MODEL = "smollm2-135m-instruct"
PATHS = ("vllm straight", "our gateway", "SMG")


def config(vllm: str) -> dict:
    return {
        "gateway": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "metrics_listen": "",
            "http_listen": f"127.0.0.1:{stack.free_port()}",
            "workers": [{"protocol": "openai-http", "address": f"http://{vllm}/v1"}],
            "limits": {"max_tokens_limit": 4096},
        },
        "worker": {"listen": vllm, "engine": "vllm", "metrics_listen": "", "vllm": {"max_model_len": 2048}},
        "envoy": {"listen": f"127.0.0.1:{stack.free_port()}", "admin_listen": f"127.0.0.1:{stack.free_port()}"},
    }


def measure(base: str, server: list[int], proxy: list[int], concurrency: int, requests: int, max_tokens: int) -> dict:
    """One run on one path; ``server``: vLLM's processes (its API server and engine core), ``proxy``: the
    gateway's (none straight)."""
    with ProcSampler(server + proxy) as sampler:
        run = asyncio.run(peer.openai_chat(base, MODEL, concurrency, requests, max_tokens))
    out = load.summary(run)
    del out["ttft_ms_all"]
    tokens = max(1, run.tokens)
    out["server_cpu_s_per_1k_tokens"] = round(sum(sampler.cpu_s[: len(server)]) / tokens * 1000, 3)
    out["proxy_cpu_s_per_1k_tokens"] = round(sum(sampler.cpu_s[len(server) :]) / tokens * 1000, 3)
    return out


def median_of(rounds: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level and round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    vllm, smg_listen = f"127.0.0.1:{stack.free_port()}", f"127.0.0.1:{stack.free_port()}"
    cfg = config(vllm)
    folder = Path(tempfile.mkdtemp(prefix="igw-bench-openai-http-"))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs = stack.Processes(folder / "config.yaml", log_dir=folder)
    results: dict = {}
    try:
        procs.start_vllm_http("vllm", vllm)
        procs.start_gateway()
        procs.start_smg("smg", smg_listen, [f"http://{vllm}"], stack.free_port())
        stack.wait_http_ok(f"http://{cfg['gateway']['http_listen']}/v1/models", 60)
        api = psutil.Process(procs.procs["vllm"].pid)
        server = [api.pid, *(p.pid for p in api.children(recursive=True))]
        paths = {
            "vllm straight": (f"http://{vllm}", []),
            "our gateway": (f"http://{cfg['gateway']['http_listen']}", [procs.procs["gateway"].pid]),
            "SMG": (f"http://{smg_listen}", [procs.procs["smg"].pid]),
        }
        for base, _ in paths.values():  # warm up every path (first-request compilation on the CPU)
            asyncio.run(peer.openai_chat(base, MODEL, 2, 2, 8))
        for c in args.concurrency:
            per: dict[str, list[dict]] = {p: [] for p in PATHS}
            for r in range(args.rounds):
                order = PATHS if r % 2 == 0 else PATHS[::-1]
                for name in order:
                    base, proxy = paths[name]
                    per[name].append(measure(base, server, proxy, c, args.requests * max(1, c // 2), args.max_tokens))
            results[c] = {name: median_of(rounds) for name, rounds in per.items()}
    finally:
        procs.stop()
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict) -> None:
    print("streams | path | tok/s | TTFT p50 ms | TTFT p99 ms | proxy CPU s/1k tok | vLLM CPU s/1k tok | errors")
    for c, per in results.items():
        base = per["vllm straight"]
        for name in PATHS:
            m = per[name]
            print(
                f"{c} | {name} | {m['tokens_per_s']:.1f} ({m['tokens_per_s'] / base['tokens_per_s']:.2f}x) | "
                f"{m['ttft_p50_ms']:.0f} ({m['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}x) | {m['ttft_p99_ms']:.0f} | "
                f"{m['proxy_cpu_s_per_1k_tokens']} | {m['server_cpu_s_per_1k_tokens']} | {m['errors']:.0f}"
            )


if __name__ == "__main__":
    main()
