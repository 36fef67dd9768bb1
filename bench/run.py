"""``make bench``: what the gateway costs, as ratios measured in one run.

Every scenario runs three ways in the same run, in rotating order so machine
noise hits all alike: straight to a worker ("direct"), through the gateway,
and through Envoy and the gateway.

- Synthetic engine (no model, so the gateway is what is measured) at
  concurrency 1, 16, 64, 256: added TTFT p50/p99, inter-token latency
  p50/p99, delivered tokens/s, gateway CPU seconds per 1,000 tokens, gateway
  RSS per stream.
- The real vLLM CPU worker with SmolLM2 at concurrency 1, 8, 32: TTFT and
  output tokens/s, gateway vs direct.

Writes ``report.md``, ``report.json`` and ``ttft.png`` (TTFT distributions)
to ``--out``. ``--short`` is the CI-sized form that ``make test`` runs.

    python -m bench.run [--short] [--out DIR] [--skip-vllm]
    python -m bench.run --vllm-worker H:P --vllm-target H:P   # reuse a running vLLM stack
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

from bench import load, typist
from igw_common import launcher as stack

MODEL = "smollm2-135m-instruct"


class Stack:
    """worker + gateway + Envoy as child processes on free loopback ports."""

    def __init__(self, engine: str, workdir: Path, synthetic_rate: float = 1000.0):
        self.dir = workdir
        self.cfg = {
            "gateway": {
                "listen": f"127.0.0.1:{stack.free_port()}",
                "metrics_listen": "",
                "http_listen": "",
                "log_level": "warning",
                "queue": {"max_queued": 4096},
            },
            "worker": {
                "listen": f"127.0.0.1:{stack.free_port()}",
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
        self.cfg["gateway"]["workers"] = [{"address": self.cfg["worker"]["listen"]}]
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(self.cfg))
        self.processes = stack.Processes(path, log_dir=self.dir)
        self.procs = self.processes.procs

    def start(self) -> None:
        self.processes.start_worker()
        self.processes.start_gateway()
        self.processes.start_envoy()

    def stop(self) -> None:
        self.processes.stop()

    @property
    def targets(self) -> dict[str, str]:
        return {
            "direct": self.cfg["worker"]["listen"],
            "gateway": self.cfg["gateway"]["listen"],
            "envoy+gateway": self.cfg["envoy"]["listen"],
        }


class ProcSampler:
    """CPU seconds and peak RSS of a process over a run (psutil, sampled every 20 ms)."""

    def __init__(self, pid: int | None):
        self.proc = psutil.Process(pid) if pid else None
        self.peak_rss = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.proc:
            self.idle_rss = self.proc.memory_info().rss
            self.cpu0 = sum(self.proc.cpu_times()[:2])
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.proc:
            self._stop.set()
            self._t.join()
            self.cpu_s = sum(self.proc.cpu_times()[:2]) - self.cpu0


def run_path(path: str, addr: str, concurrency: int, requests: int, max_tokens: int, gateway_pid: int | None) -> dict:
    sampler_pid = gateway_pid if path != "direct" else None
    with ProcSampler(sampler_pid) as sampler:
        if path == "direct":
            result = asyncio.run(load.direct(addr, MODEL, concurrency, requests, max_tokens))
        else:
            result = asyncio.run(load.via_gateway(addr, concurrency, requests, max_tokens))
    out = load.summary(result)
    if sampler_pid:
        out["gateway_cpu_s_per_1k_tokens"] = round(sampler.cpu_s / max(1, result.tokens) * 1000, 4)
        out["gateway_rss_kib_per_stream"] = round(max(0, sampler.peak_rss - sampler.idle_rss) / 1024 / concurrency, 1)
    return out


def scenario(
    targets: dict[str, str], concurrency: int, requests: int, max_tokens: int, rounds: int, gateway_pid: int | None
) -> dict:
    paths = list(targets)
    per_path: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(rounds):
        for p in paths[r % len(paths) :] + paths[: r % len(paths)]:
            per_path[p].append(run_path(p, targets[p], concurrency, requests, max_tokens, gateway_pid))
    merged = {}
    for p, runs in per_path.items():
        m = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "ttft_ms_all"}
        m["ttft_ms_all"] = [t for x in runs for t in x["ttft_ms_all"]]
        merged[p] = m
    d = merged["direct"]
    for p in paths[1:]:
        g = merged[p]
        g["added_ttft_p50_ms"] = round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 2)
        g["added_ttft_p99_ms"] = round(g["ttft_p99_ms"] - d["ttft_p99_ms"], 2)
        g["tokens_per_s_vs_direct"] = round(g["tokens_per_s"] / d["tokens_per_s"], 3) if d["tokens_per_s"] else None
    return merged


def report_md(results: dict) -> str:
    lines = [
        "# Gateway benchmark",
        "",
        f"{results['machine']}; {results['mode']} mode; "
        f"each figure is the median of {results['rounds']} rounds, paths in rotating order.",
        "",
    ]
    for name, title in (
        ("synthetic", "Synthetic engine (gateway overhead)"),
        ("vllm", "vLLM CPU worker, SmolLM2-135M"),
    ):
        if name not in results:
            continue
        lines += [
            f"## {title}",
            "",
            "| concurrency | path | tok/s | vs direct | TTFT p50 ms | TTFT p99 ms | added TTFT p50/p99 ms "
            "| ITL p50 ms | ITL p99 ms | gateway CPU s / 1k tok | gateway RSS KiB / stream | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c, paths in results[name]["scenarios"].items():
            for p, m in paths.items():
                added = (
                    f"{m['added_ttft_p50_ms']:+.1f} / {m['added_ttft_p99_ms']:+.1f}" if "added_ttft_p50_ms" in m else ""
                )
                lines.append(
                    f"| {c} | {p} | {m['tokens_per_s']:.0f} | {m.get('tokens_per_s_vs_direct') or ''} | "
                    f"{m['ttft_p50_ms']:.1f} | {m['ttft_p99_ms']:.1f} | {added} | {m['itl_p50_ms']:.2f} | "
                    f"{m['itl_p99_ms']:.2f} | {m.get('gateway_cpu_s_per_1k_tokens', '')} | "
                    f"{m.get('gateway_rss_kib_per_stream', '')} | {m['errors']:.0f} |"
                )
        lines += ["", results[name]["setup"], ""]
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


def write_docs(page: Path, report: str) -> None:
    """Replace what is between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in ``page`` with the
    report's tables (the prose around them is written by hand and stays)."""
    text = page.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    body = report.split("\n", 1)[1].strip()  # without the report's own title
    body = body.replace("\n## ", "\n### ")
    page.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, c) for n in ("synthetic", "vllm") if n in results for c in [list(results[n]["scenarios"])[-1]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, c) in zip(axes[0], panels):
        for p, m in results[name]["scenarios"][c].items():
            xs = sorted(m["ttft_ms_all"])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=p)
        ax.set_title(f"{name}: TTFT distribution at concurrency {c}")
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gateway overhead benchmark (ratios vs straight-to-worker)")
    p.add_argument("--short", action="store_true", help="CI-sized: fewer levels, requests and rounds")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--vllm-worker", help="worker of a running vLLM stack (else one is started)")
    p.add_argument("--vllm-target", help="Envoy of that stack")
    p.add_argument("--docs", type=Path, help="also put the tables into this page, between its bench markers")
    args = p.parse_args(argv)

    short = args.short
    rounds = 1 if short else 3
    results = {
        "mode": "short" if short else "full",
        "rounds": rounds,
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="igw-bench-"))

    levels, tokens = ([1, 16], 16) if short else ([1, 16, 64, 256], 64)
    rate = 1000.0  # "full speed": 1 ms engine steps, so the gateway's own cost dominates
    print(f"synthetic: {rate:g} tokens/s per stream, max_tokens={tokens}, levels {levels}", flush=True)
    (work / "synthetic").mkdir()
    s = Stack("synthetic", work / "synthetic", synthetic_rate=rate)
    try:
        s.start()
        pid = s.procs["gateway"].pid
        results["synthetic"] = {
            "setup": f"Synthetic worker at {rate:g} tokens/s per stream, {tokens} tokens per "
            f"request, requests per level = max(2 x concurrency, 16).",
            "scenarios": {},
        }
        for c in levels:
            n = max(c if short else 2 * c, 8 if short else 16)
            results["synthetic"]["scenarios"][c] = scenario(s.targets, c, n, tokens, rounds, pid)
            print(f"  concurrency {c}: done", flush=True)
    finally:
        s.stop()

    if not args.skip_vllm:
        vlevels, vtokens = ([1, 8], 16) if short else ([1, 8, 32], 64)
        v = None
        if args.vllm_worker and args.vllm_target:
            targets, vpid = {"direct": args.vllm_worker, "envoy+gateway": args.vllm_target}, None
        else:
            print("vllm: starting the worker (about a minute) ...", flush=True)
            (work / "vllm").mkdir()
            v = Stack("vllm", work / "vllm")
            v.start()
            targets = {"direct": v.targets["direct"], "envoy+gateway": v.targets["envoy+gateway"]}
            vpid = v.procs["gateway"].pid
        try:
            results["vllm"] = {
                "setup": f"vLLM CPU worker (SmolLM2-135M-Instruct, bf16), {vtokens} tokens per request, temperature 0.",
                "scenarios": {},
            }
            for c in vlevels:
                n = max(c if short else 2 * c, 4 if short else 8)
                results["vllm"]["scenarios"][c] = scenario(targets, c, n, vtokens, rounds, vpid)
                print(f"  vllm concurrency {c}: done", flush=True)
            print("typist: as-you-type completion, with and without supersession", flush=True)
            shape = dict(editors=2, bursts=1, keys=3, max_tokens=16) if short else {}
            results["typist"] = typist.run(targets["envoy+gateway"], targets["direct"], **shape)
            results["typist"]["setup"] = (
                f"{shape.get('editors', 8)} editors typing bursts of {shape.get('keys', 6)} keystrokes 150 ms "
                f"apart, {shape.get('bursts', 3)} bursts each; every keystroke a request of "
                f"{shape.get('max_tokens', 64)} tokens (temperature 0) through Envoy + gateway to the vLLM worker."
            )
        finally:
            if v:
                v.stop()

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
