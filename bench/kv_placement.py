"""``make bench``: placement by cached prefix on real vLLM, against least-load and affinity, same run.

Two vLLM CPU workers (the embedded model, prefix caching on, as vLLM's default) and one gateway per
strategy (``gateway.placement.strategy``: kv_cache, affinity, least_loaded), all on the same workers.
The workload is agent-shaped: sessions whose turns share one long system prompt, each session with its
own long repository context, more sessions than workers, run at once, turns in order within a session
(each turn resends the whole conversation, as agents do). Every strategy gets its own fresh text (a tag
in the system prompt), so no strategy finds what another left in the caches.

Each worker's KV cache holds ``--cache-blocks`` blocks of 128 tokens (vLLM's
``num_gpu_blocks_override``): about half of what all sessions' prefixes take, as on a loaded GPU,
where the cache is full and what one worker duplicates of another's evicts something. Every worker is
warmed up (unrelated prompts of the same sizes) after it starts, so first-request compilation on the
CPU is not counted. ``--no-session-ids``: the clients send no conversation id (affinity then keys on
the prompt's prefix, which changes every turn).

Per strategy: TTFT p50 (the gateway's ``Done.timings.ttft_ms``) and vLLM's own prefix-cache hit rate
(``Done.usage.cached_prompt_tokens`` over ``prompt_tokens``), against the best possible hit rate for the
workload (every block computed once on one cache; two workers can at best approach it). Then, per
strategy, one worker restarts and the sessions go on: the same figures after the restart.

    python -m bench.kv_placement [--sessions 6] [--turns 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml

from bench import resume
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack

STRATEGIES = ("kv_cache", "affinity", "least_loaded")
WORDS = (
    "parser lexer token buffer cache index route worker session stream queue batch frame socket "
    "retry deadline budget quota tenant schema tool call result file module import class method"
).split()


def config(strategy: str, workers: list[str], cache_blocks: int) -> dict:
    return {
        "gateway": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "metrics_listen": "",
            "http_listen": "",
            "workers": [{"address": a} for a in workers],
            "placement": {"strategy": strategy},
        },
        "worker": {
            "listen": workers[0],
            "engine": "vllm",
            "metrics_listen": "",
            "vllm": {
                "max_model_len": 4096,
                "kv_cache_space_gib": 1,
                "engine_args": {"num_gpu_blocks_override": cache_blocks},
            },
        },
        "envoy": {"listen": f"127.0.0.1:{stack.free_port()}", "admin_listen": f"127.0.0.1:{stack.free_port()}"},
    }


def _text(seed: str, words: int) -> str:
    """Deterministic filler that tokenizes to about 1.3 tokens a word."""
    h = uuid.uuid5(uuid.NAMESPACE_OID, seed).int
    out = []
    for i in range(words):
        h = (h * 6364136223846793005 + 1442695040888963407 + i) % 2**64
        out.append(WORDS[h % len(WORDS)])
    return " ".join(out)


def system_prompt(tag: str, words: int) -> str:
    return f"You are a coding agent ({tag}). Team conventions follow.\n" + _text(f"sys{tag}", words)


def repo_context(tag: str, session: int, words: int) -> str:
    return f"Repository {tag}-{session} (files and notes):\n" + _text(f"repo{tag}{session}", words)


def messages(tag: str, session: int, history: list[tuple[str, str]], sys_words: int, repo_words: int):
    msgs = [gpb.ChatMessage(role="system", content=system_prompt(tag, sys_words))]
    first = True
    for question, answer in history:
        content = f"{repo_context(tag, session, repo_words)}\n\n{question}" if first else question
        msgs.append(gpb.ChatMessage(role="user", content=content))
        first = False
        if answer is not None:
            msgs.append(gpb.ChatMessage(role="assistant", content=answer))
    return msgs


def run_sessions(stub, tag: str, sessions: int, turns: range, histories: dict, args) -> list[dict]:
    """Every session's turns ``turns`` (in order within a session), all sessions at once."""

    def one(s: int) -> list[dict]:
        out = []
        history = histories.setdefault(s, [])
        for t in turns:
            history.append((f"Turn {t}: what does module {t} of this repository do?", None))
            req = gpb.ExecuteRequest(
                messages=messages(tag, s, history, args.system_words, args.repo_words),
                session_id="" if args.no_session_ids else f"{tag}-{s}",  # the agent's conversation id
                sampling=gpb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
            )
            text, r = "", {"session": s, "turn": t, "sent_at": time.monotonic()}
            for ev in stub.Execute(req, timeout=600):
                if ev.HasField("started"):
                    r["worker"] = ev.started.worker
                elif ev.HasField("delta"):
                    text += ev.delta.text
                elif ev.HasField("done"):
                    u = ev.done.usage
                    r.update(ttft_ms=ev.done.timings.ttft_ms, prompt=u.prompt_tokens, cached=u.cached_prompt_tokens)
            history[-1] = (history[-1][0], text)
            out.append(r)
        return out

    with ThreadPoolExecutor(sessions) as ex:
        return [r for rs in ex.map(one, range(sessions)) for r in rs]


def best_hit_rate(requests: list[dict], tokenizer, block_size: int, tag: str, args, histories) -> float:
    """Every block computed once, on one cache: a request finds every block some earlier request had."""
    from igw_common.kv_blocks import prompt_block_keys

    seen: set[bytes] = set()
    cached = total = 0
    for r in sorted(requests, key=lambda r: r["sent_at"]):
        history = histories[r["session"]][: r["turn"] + 1]
        history = [*history[:-1], (history[-1][0], None)]
        msgs = [
            {"role": m.role, "content": m.content}
            for m in messages(tag, r["session"], history, args.system_words, args.repo_words)
        ]
        keys = prompt_block_keys(tokenizer.encode_chat(msgs), block_size)
        n = 0
        while n < len(keys) and keys[n] in seen:
            n += 1
        cached += n * block_size
        total += r["prompt"]
        seen.update(keys)
    return cached / total if total else 0.0


def summary(requests: list[dict]) -> dict:
    prompt = sum(r["prompt"] for r in requests)
    return {
        "requests": len(requests),
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in requests),
        "hit_rate": round(sum(r["cached"] for r in requests) / prompt, 3) if prompt else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3, help="turns per session before the restart (as many after)")
    ap.add_argument("--system-words", type=int, default=450)
    ap.add_argument("--repo-words", type=int, default=1100)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--cache-blocks", type=int, default=80, help="KV-cache blocks (128 tokens) per worker")
    ap.add_argument("--no-session-ids", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from gateway.workers.tokenization import ModelTokenizer
    from inference import embedded_model

    tokenizer = ModelTokenizer(embedded_model.prepare())
    workers = [f"127.0.0.1:{stack.free_port()}" for _ in range(2)]
    figures: dict = {"sessions": args.sessions, "turns_before_and_after_restart": args.turns}
    with tempfile.TemporaryDirectory(prefix="igw-kv-bench-") as tmp:
        work = Path(tmp)
        procs = {}
        try:
            for strategy in STRATEGIES:
                path = work / f"{strategy}.yaml"
                path.write_text(yaml.safe_dump(config(strategy, workers, args.cache_blocks)))
                (work / strategy).mkdir()
                procs[strategy] = stack.Processes(path, log_dir=work / strategy)
            first = procs[STRATEGIES[0]]
            for i, a in enumerate(workers):
                first.start_worker(name=f"worker{i}", listen=a)
            stubs = {}
            for strategy, p in procs.items():
                p.start_gateway()
                stubs[strategy] = gpb_grpc.GatewayStub(grpc.insecure_channel(p.cfg.gateway.listen))
                resume.wait_ready(stubs[strategy], 2)
            warm_up(stubs[STRATEGIES[-1]], args)
            for strategy in STRATEGIES:
                tag, histories = uuid.uuid4().hex[:8], {}
                before = run_sessions(stubs[strategy], tag, args.sessions, range(args.turns), histories, args)
                first.stop_process("worker1")
                first.start_worker(name="worker1", listen=workers[1])
                resume.wait_ready(stubs[strategy], 2)
                warm_up(stubs["least_loaded"], args)
                after = run_sessions(
                    stubs[strategy], tag, args.sessions, range(args.turns, 2 * args.turns), histories, args
                )
                figures[strategy] = {
                    **summary(before),
                    "best_hit_rate": round(best_hit_rate(before, tokenizer, 128, tag, args, histories), 3),
                    "after_restart": summary(after),
                }
                print("KV", strategy, json.dumps(figures[strategy]), flush=True)
        finally:
            for p in reversed(list(procs.values())):
                p.stop()
    kv = figures["kv_cache"]
    for other in ("least_loaded", "affinity"):
        o = figures[other]
        figures[f"ttft_p50_kv_vs_{other}"] = round(kv["ttft_ms_p50"] / o["ttft_ms_p50"], 2)
        figures[f"ttft_p50_kv_vs_{other}_after_restart"] = round(
            kv["after_restart"]["ttft_ms_p50"] / o["after_restart"]["ttft_ms_p50"], 2
        )
    figures["hit_rate_kv_vs_best"] = round(kv["hit_rate"] / kv["best_hit_rate"], 2) if kv["best_hit_rate"] else None
    print("KV_PLACEMENT", json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def warm_up(stub, args) -> None:
    """Unrelated prompts of the workload's sizes, spread over both workers by least load, so the CPU
    engines' first-request compilation is not what a strategy is measured by."""
    tag = uuid.uuid4().hex[:8]
    for _ in range(2):
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda s: run_sessions(stub, f"{tag}{s}", 1, range(1), {}, args), range(4)))


if __name__ == "__main__":
    main()
