"""Shared by the adversarial suites (tests/integration/test_adversarial*.py): hostile request strategies
(hypothesis), the canary stream that runs beside them, and the checks every answer must pass."""

from __future__ import annotations

import math
import os
import threading
import time

import grpc
from hypothesis import HealthCheck
from hypothesis import strategies as st

from gateway.v1 import gateway_pb2 as gpb

EXAMPLES = int(os.environ.get("IGW_ADVERSARIAL_EXAMPLES", "2000"))
SETTINGS = dict(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("IGW_ADVERSARIAL_RANDOM") != "1",
    suppress_health_check=list(HealthCheck),
)
MODEL = "smollm2-135m-instruct"
CANARY_TOKENS = 300
LONG = 30.0  # the client deadline of cases that set none: a call that has not answered by then hangs


class CanaryLoop:
    """Streams of known length, back to back, with the request id the hostile cases also use."""

    def __init__(self, stub, key):
        self.stub, self.key = stub, key
        self.completed = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        md = [("authorization", f"Bearer {self.key}")]
        while not self._stop.is_set():
            req = gpb.ExecuteRequest(
                task="canary",
                request_id="dup",
                # not deterministic: where the response cache is on, the canary must still reach the worker
                sampling=gpb.SamplingParams(max_tokens=CANARY_TOKENS, temperature=0.8),
            )
            try:
                out = list(self.stub.Execute(req, metadata=md, timeout=60))
                tokens = sum(r.delta.tokens for r in out if r.WhichOneof("event") == "delta")
                if out[-1].done.usage.completion_tokens != CANARY_TOKENS or tokens != CANARY_TOKENS:
                    self.failures.append(
                        f"inexact canary: {tokens} tokens, done says {out[-1].done.usage.completion_tokens}"
                    )
                else:
                    self.completed += 1
            except grpc.RpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    def stop(self):
        self._stop.set()
        self._t.join(90)


# --- strategies ---------------------------------------------------------------------

odd_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
near = lambda limit: st.integers(limit - 2, limit + 2)  # noqa: E731


@st.composite
def sized_text(draw, limit: int):
    """Text around a character limit, sometimes with multi-byte characters."""
    n = draw(near(limit))
    ch = draw(st.sampled_from(["a", "é", "漢", "🙂", "\x00"]))
    return ch * n


json_leaf = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), odd_text)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(odd_text, kids, max_size=4)),
    max_leaves=20,
)


@st.composite
def deep_context(draw):
    depth = draw(st.integers(10, 45))
    value: object = draw(json_leaf.filter(lambda v: not isinstance(v, float) or math.isfinite(v)))
    for _ in range(depth):
        value = {"k": value} if draw(st.booleans()) else [value]
    return {"root": value}


@st.composite
def wide_context(draw):
    n = draw(st.integers(1_000, 9_000))
    return {f"k{i}": "v" * 4 for i in range(n)}  # ~10 bytes of JSON each: around the 64 KiB limit


# Each field: a valid draw and a hostile one. A case corrupts a few fields of an otherwise valid request,
# so most cases probe one limit at a time and a good share stream for real.
VALID = {
    "task": st.one_of(st.just("write a function"), odd_text.filter(str.strip)),
    "context": st.one_of(
        st.none(),
        st.dictionaries(odd_text, json_leaf.filter(lambda v: not isinstance(v, float) or math.isfinite(v)), max_size=4),
    ),
    "messages": st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), odd_text), max_size=3),
    "model": st.sampled_from(["", MODEL]),
    "request_id": st.sampled_from(["", "dup", "dup", "a" * 128, "r-1.x:y_z"]),
    "session_id": st.one_of(st.just(""), odd_text),
    "max_tokens": st.one_of(st.none(), st.integers(1, 12)),
    "temperature": st.one_of(st.none(), st.floats(0, 2)),
    "top_p": st.one_of(st.none(), st.floats(0.01, 1)),
    "stop": st.lists(st.text(min_size=1, max_size=64), max_size=8),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    "priority": st.integers(0, 2),
}
HOSTILE = {
    "task": st.one_of(st.just(""), st.just("   "), sized_text(32_768)),
    "context": st.one_of(st.dictionaries(odd_text, json_value, min_size=1, max_size=5), deep_context(), wide_context()),
    "messages": st.one_of(
        st.lists(st.tuples(st.sampled_from(["", "User", "tool", "x" * 300, "\n"]), odd_text), min_size=1, max_size=3),
        st.integers(1, 2).flatmap(
            lambda n: st.lists(st.tuples(st.just("user"), sized_text(32_768)), min_size=n, max_size=n)
        ),
        st.sampled_from([63, 64, 65]).map(lambda n: [("user", "m")] * n),
    ),
    "model": st.sampled_from(["nope", "a" * 129, "org/model", "\n", "x" * 5000, MODEL + "\n"]),
    "request_id": st.one_of(st.sampled_from(["abc\n", "a" * 129, "bad id", "ü"]), odd_text),
    "session_id": st.text(min_size=120, max_size=140),
    "max_tokens": st.sampled_from([0, -1, 4097, 2**31 - 1, -(2**31), 40]),
    "temperature": st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 2.5]),
    "top_p": st.sampled_from([math.nan, math.inf, 0.0, -1.0, 1.5]),
    "stop": st.one_of(
        st.lists(st.just("s"), min_size=9, max_size=12),
        st.lists(st.text(min_size=65, max_size=70), min_size=1, max_size=2),
        st.just([""]),
    ),
    "seed": st.just(0),
    "priority": st.integers(3, 1_000),
}


@st.composite
def requests(draw):
    bad = set(draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=3)))
    v = {name: draw(HOSTILE[name] if name in bad else VALID[name]) for name in VALID}
    r = gpb.ExecuteRequest(
        task=v["task"], model=v["model"], request_id=v["request_id"], session_id=v["session_id"], priority=v["priority"]
    )
    if v["context"] is not None:
        try:
            r.context.update(v["context"])
        except (ValueError, RecursionError):  # the client library itself refuses to build it
            pass
    for role, content in v["messages"]:
        r.messages.add(role=role, content=content)
    s = r.sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if v[name] is not None:
            setattr(s, name, v[name])
    s.stop.extend(v["stop"])
    return r


credentials = st.sampled_from(["good"] * 10 + ["none", "garbage", "long", "revoked-shape"])
timeouts = st.sampled_from([None, None, None, 0.001, 0.05, 0.5, 120 * 86_400.0])


def metadata_for(kind: str, key: str):
    return {
        "good": [("authorization", f"Bearer {key}")],
        "none": [],
        "garbage": [("authorization", "Bearer not a key at all")],
        "long": [("x-api-key", "igw_" + "a" * 4000)],
        "revoked-shape": [("authorization", f"Bearer igw_{'b' * 12}_{'c' * 43}")],
    }[kind]


ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def check_call(stub, request, md, timeout):
    started = time.monotonic()
    try:
        out = list(stub.Execute(request, metadata=md, timeout=timeout if timeout is not None else LONG))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        out, code, details = [], err.code(), err.details() or ""
    assert code in ALLOWED, f"{code.name}: {details[:300]}"
    assert len(details) < 2_000, f"unbounded message ({len(details)} chars)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert timeout is not None and timeout <= 1.0, (
            f"a call with a long deadline hung for {time.monotonic() - started:.1f} s"
        )
    if code == grpc.StatusCode.OK:
        kinds = [r.WhichOneof("event") for r in out]
        assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"delta"}, kinds[:5]
        assert (
            sum(r.delta.tokens for r in out if r.WhichOneof("event") == "delta") == out[-1].done.usage.completion_tokens
        )
    return code


def leases_in_use(stub, md, timeout_s: float = 5.0) -> dict[str, int]:
    """Concurrent-stream leases the caller's budgets hold ({scope: count}), polled until all are 0 or
    ``timeout_s`` passes (settles are written in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        q = stub.GetQuota(gpb.GetQuotaRequest(), metadata=md, timeout=5)
        in_use = {b.scope: b.concurrent_streams_in_use for b in q.budgets}
        if all(v == 0 for v in in_use.values()) or time.monotonic() > deadline:
            return in_use
        time.sleep(0.1)


def hostile_keys(keys) -> str:
    """The hostile tenant (64 streams) and its key (16 streams) in the key file ``keys``."""
    from tests.helpers import igw_keys

    igw_keys("tenant", "--file", str(keys), "hostile", "--concurrent", "64")
    return igw_keys("issue", "--file", str(keys), "--tenant", "hostile", "--concurrent", "16")


def hostile_case(state: dict, request, cred: str, timeout) -> None:
    """One hostile call, checked (``check_call``) and counted in ``state``."""
    code = check_call(state["stub"], request, metadata_for(cred, state["key"]), timeout)
    state["calls"] += 1
    state["codes"][code.name] = state["codes"].get(code.name, 0) + 1


def after_the_storm(state: dict) -> list:
    """The canary's streams were all exact and no quota lease is left; returns the key's metadata."""
    canary = state["canary"]
    assert state["calls"] >= EXAMPLES, state["calls"]
    canary.stop()
    assert not canary.failures, canary.failures[:5]
    assert canary.completed >= 3, "the canary hardly ran"
    print(f"\n{state['calls']} hostile calls: {state['codes']}; {canary.completed} canary streams, all exact")
    md = [("authorization", f"Bearer {state['key']}")]
    in_use = leases_in_use(state["stub"], md)
    assert in_use == {"key": 0, "tenant": 0}, in_use
    return md
