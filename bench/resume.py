"""``make bench``: resume after the first token, on real vLLM. Two vLLM CPU workers (the embedded model)
behind one gateway; N greedy streams on one worker (one affinity key), first uninterrupted, then again
with that worker killed (SIGKILL) once every stream has a few tokens. Reports how many completed with
text identical to the uninterrupted run, and the longest pause each client saw against the longest gap
between tokens of the uninterrupted run (same run, same machine).

    python -m bench.resume [--streams 16] [--max-tokens 48] [--json FILE] [--native-relay]

``--native-relay``: with ``gateway.native_relay`` on, the streams through the relay (``make native``).

``tests/e2e/test_resume_vllm.py`` runs the same measurement and asserts on it.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack

TOPICS = (
    "a lighthouse,a robot,the sea,a library,a fox,winter,a train,a garden,a bridge,the moon,a clock,a river,"
    "a city,a violin,a desert,a kite"
).split(",")


def config(workdir: Path, native_relay: bool = False) -> dict:
    """Two vLLM workers (float32: a continuation's prefill and the uninterrupted run's decode steps then
    agree to the argmax) and one gateway, on free loopback ports (with its native relay on, if asked)."""
    workers = [f"127.0.0.1:{stack.free_port()}" for _ in range(2)]
    relay = {"enabled": native_relay, "listen": f"127.0.0.1:{stack.free_port()}"}
    return {
        "gateway": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "metrics_listen": f"127.0.0.1:{stack.free_port()}",
            "http_listen": "",
            "workers": [{"address": a} for a in workers],
            "native_relay": relay,
        },
        "worker": {
            "listen": workers[0],
            "engine": "vllm",
            "metrics_listen": "",
            "vllm": {"max_model_len": 2048, "kv_cache_space_gib": 1, "engine_args": {"dtype": "float32"}},
        },
        "envoy": {"listen": f"127.0.0.1:{stack.free_port()}", "admin_listen": f"127.0.0.1:{stack.free_port()}"},
    }


def request(i: int, max_tokens: int) -> gpb.ExecuteRequest:
    # One session id (sessions off: worker affinity only), so every stream runs on one worker.
    return gpb.ExecuteRequest(
        task=f"Write a short story about {TOPICS[i % len(TOPICS)]}.",
        session_id="resume-bench",
        sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def run_streams(stub, streams: int, max_tokens: int, on_progress=None) -> list[dict]:
    """``streams`` greedy streams at once, collected; ``on_progress(tokens per stream)`` after every delta."""
    progress = [0] * streams
    lock = threading.Lock()

    def one(i):
        out = {"text": "", "tokens": 0, "gaps": [], "worker": "", "usage": None, "error": None}
        last = None
        try:
            for ev in stub.Execute(request(i, max_tokens), timeout=600):
                now = time.monotonic()
                if ev.HasField("started"):
                    out["worker"] = ev.started.worker
                elif ev.HasField("delta"):
                    out["text"] += ev.delta.text
                    out["tokens"] += ev.delta.tokens
                    if last is not None:
                        out["gaps"].append(now - last)
                    last = now
                    with lock:
                        progress[i] = out["tokens"]
                        if on_progress is not None:
                            on_progress(progress)
                elif ev.HasField("done"):
                    out["usage"] = (ev.done.usage.prompt_tokens, ev.done.usage.completion_tokens)
        except grpc.RpcError as err:
            out["error"] = f"{err.code().name}: {err.details()}"
        return out

    with ThreadPoolExecutor(streams) as ex:
        return list(ex.map(one, range(streams)))


def measure(processes, stub, worker_names: dict[str, str], streams: int, max_tokens: int) -> dict:
    """Baseline, then the same streams with their worker killed once each has 4 tokens. ``worker_names``
    maps a worker address to its process name."""
    baseline = run_streams(stub, streams, max_tokens)
    homes = {r["worker"] for r in baseline}
    if len(homes) != 1 or any(r["error"] for r in baseline):
        raise RuntimeError(f"the uninterrupted run did not run on one worker without error: {baseline}")
    victim = processes.procs[worker_names[homes.pop()]]
    killed = threading.Event()

    def kill_when_under_way(progress):
        if not killed.is_set() and min(progress) >= 4:
            killed.set()
            victim.send_signal(signal.SIGKILL)

    resumed = run_streams(stub, streams, max_tokens, kill_when_under_way)
    pauses = [max(r["gaps"], default=0.0) for r in resumed]
    base_gap = max(max(b["gaps"], default=0.0) for b in baseline)
    return {
        "streams": streams,
        "killed_mid_stream": killed.is_set(),
        "errors": sum(1 for r in resumed if r["error"]),
        "identical_text": sum(1 for b, r in zip(baseline, resumed, strict=True) if b["text"] == r["text"]),
        "exact_usage": sum(1 for b, r in zip(baseline, resumed, strict=True) if b["usage"] == r["usage"]),
        "pause_s_median": round(statistics.median(pauses), 2),
        "pause_s_max": round(max(pauses), 2),
        "baseline_gap_s_max": round(base_gap, 2),
        "pause_vs_baseline_gap": round(statistics.median(pauses) / base_gap, 1) if base_gap else None,
        "_runs": (baseline, resumed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--native-relay", action="store_true", help="with gateway.native_relay on, through the relay")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="igw-resume-") as tmp:
        work = Path(tmp)
        cfg = config(work, args.native_relay)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        processes = stack.Processes(work / "config.yaml", log_dir=work)
        addrs = [w["address"] for w in cfg["gateway"]["workers"]]
        names = {a: f"worker{i}" for i, a in enumerate(addrs)}
        try:
            for a, name in names.items():
                processes.start_worker(name=name, listen=a)
            processes.start_gateway()
            stub = gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["listen"]))
            wait_ready(stub, 2)
            if args.native_relay:
                stub = gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["native_relay"]["listen"]))
            figures = measure(processes, stub, names, args.streams, args.max_tokens)
        finally:
            processes.stop()
    figures.pop("_runs")
    print("RESUME", json.dumps(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def wait_ready(stub, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        models = stub.ListModels(gpb.ListModelsRequest(), timeout=5).models
        if models and models[0].ready_workers == n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ready workers never reached {n}")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
