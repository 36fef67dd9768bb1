"""What the tests of state beyond a stream share (response cache, sessions, jobs, budgets): gateway replicas
whose ports the test knows, calls that collect a whole stream, and metrics scrapes."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from tests.helpers import Stack, free_port


@dataclass
class Replica:
    name: str
    listen: str
    metrics: str
    http: str

    def stub(self) -> gpb_grpc.GatewayStub:
        return gpb_grpc.GatewayStub(grpc.insecure_channel(self.listen))


def start_replica(s: Stack, name: str) -> Replica:
    """Another gateway process on the stack's config, with ports the test knows."""
    r = Replica(name, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    args = [sys.executable, "-m", "gateway.server", "--config", str(s.config_path)]
    args += ["--listen", r.listen, "--metrics-listen", r.metrics, "--http-listen", r.http]
    s.start_process(name, args, r.listen, 60)
    return r


@dataclass
class Answer:
    started: gpb.Started | None = None
    text: str = ""
    tokens: int = 0
    deltas: int = 0
    done: gpb.Done | None = None
    first_at: float = 0.0  # seconds from the call to the first delta (client-side TTFT)
    total_s: float = 0.0


def md(key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] if key else []


def ask(stub, key=None, timeout=60, **fields) -> Answer:
    """One Execute call, collected: started, text, token count, done, client-side timings."""
    out = Answer()
    t0 = time.monotonic()
    for ev in stub.Execute(gpb.ExecuteRequest(**fields), metadata=md(key), timeout=timeout):
        if ev.HasField("started"):
            out.started = ev.started
        elif ev.HasField("delta"):
            if not out.deltas:
                out.first_at = time.monotonic() - t0
            out.deltas += 1
            out.text += ev.delta.text
            out.tokens += ev.delta.tokens
        else:
            out.done = ev.done
    out.total_s = time.monotonic() - t0
    return out


def greedy(max_tokens: int, **kw) -> gpb.SamplingParams:
    return gpb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def scrape(addr: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def log_lines(path, event: str = "request") -> list[dict]:
    """The JSON log lines of one kind a process wrote (igw_common.logs: one object per line)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        fields = d.get("fields", d)
        if fields.get("event") == event:
            out.append(fields)
    return out


@dataclass
class Timer:
    samples: list[float] = field(default_factory=list)

    def add(self, s: float) -> None:
        self.samples.append(s)

    def median_ms(self) -> float:
        xs = sorted(self.samples)
        return 1000 * xs[len(xs) // 2] if xs else float("nan")
