"""The OpenAI-compatible HTTP door through Envoy (synthetic engine): format, errors, disconnects, supersession.

The same behaviour against a real vLLM worker is in tests/e2e/test_openai_vllm.py; here the synthetic
engine makes the fault cases fast.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import grpc
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, igw_keys, make_config

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def http_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    keys = tmp / "keys.yaml"
    key = igw_keys("issue", "--file", str(keys), "--tenant", "acme")
    other = igw_keys("issue", "--file", str(keys), "--tenant", "beta")
    limited = igw_keys("issue", "--file", str(keys), "--tenant", "acme", "--rpm", "1")
    wrong_model = igw_keys("issue", "--file", str(keys), "--tenant", "acme", "--model", "another-model")
    cfg = make_config(
        "synthetic",
        worker={"max_concurrent_requests": 4, "synthetic": {"tokens_per_s": 50, "fill_in_middle": True}},
        gateway={"auth": {"mode": "api_key", "key_file": str(keys)}},
    )
    s = build_stack(tmp, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        yield s, {"good": key, "other": other, "limited": limited, "wrong_model": wrong_model}
    finally:
        s.stop()


def client(s, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{s.envoy}/v1", api_key=key, max_retries=0, timeout=30)


def raw(s, method, path, body=None, headers=None):
    """One request with http.client (what curl does): (status, headers, body bytes)."""
    host, port = s.envoy.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def test_chat_and_completions_with_the_openai_package(http_stack):
    s, k = http_stack
    c = client(s, k["good"])
    assert [m.id for m in c.models.list()] == [MODEL]
    whole = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    assert whole.choices[0].message.content == "lorem ipsum dolor sit amet lorem "
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = c.completions.create(model=MODEL, prompt="def reverse(s):", max_tokens=3)
    assert text.choices[0].text == "lorem ipsum dolor " and text.usage.completion_tokens == 3
    fim = c.completions.create(model=MODEL, prompt="def f(", suffix="):\n    pass", max_tokens=2, stream=True)
    assert "".join(ch.choices[0].text for ch in fim) == "lorem ipsum "


def test_raw_sse_is_what_curl_sees(http_stack):
    s, k = http_stack
    status, headers, body = raw(
        s,
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        {"authorization": f"Bearer {k['good']}"},
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "case, status, param",
    [
        ("no key", 401, None),
        ("model not allowed", 403, None),
        ("unknown model", 404, "model"),
        ("unsupported parameter", 400, "logit_bias"),
        ("unsupported value", 400, "n"),
        ("tools", 400, "tools[0]"),
        ("bad temperature", 400, "temperature"),
        ("bad role", 400, "messages[0].role"),
        ("image part", 400, "messages[0].content[0]"),
        ("too long", 400, "max_tokens"),
        ("not json", 400, "body"),
        ("bad priority header", 400, "x-igw-priority"),
    ],
)
def test_errors_are_openai_shaped_with_the_matching_status(http_stack, case, status, param):
    s, k = http_stack
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"authorization": f"Bearer {k['good']}"}
    if case == "no key":
        headers = {}
    elif case == "model not allowed":
        headers = {"authorization": f"Bearer {k['wrong_model']}"}
    elif case == "unknown model":
        body["model"] = "nope"
    elif case == "unsupported parameter":
        body["logit_bias"] = {"50256": -100}
    elif case == "unsupported value":
        body["n"] = 3
    elif case == "tools":
        body["tools"] = [{"type": "code_interpreter"}]
    elif case == "bad temperature":
        body["temperature"] = 9
    elif case == "bad role":
        body["messages"] = [{"role": "function", "content": "x"}]
    elif case == "image part":
        body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    elif case == "too long":
        body["max_tokens"] = 100_000
    elif case == "not json":
        body = b"{not json"
    elif case == "bad priority header":
        headers["x-igw-priority"] = "urgent"
    got, _, out = raw(s, "POST", "/v1/chat/completions", body, headers)
    err = json.loads(out)["error"]
    assert got == status, err
    assert err["param"] == param and err["message"] and err["type"]


def test_quota_denial_is_429_with_retry_after(http_stack):
    s, k = http_stack
    headers = {"authorization": f"Bearer {k['limited']}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert raw(s, "POST", "/v1/completions", body, headers)[0] == 200
    status, hdrs, out = raw(s, "POST", "/v1/completions", body, headers)
    assert status == 429 and 1 <= int(hdrs["retry-after"]) <= 60
    assert json.loads(out)["error"]["code"] == "quota_requests"


def test_body_over_the_size_budget_is_refused(http_stack):
    s, k = http_stack
    body = {"model": MODEL, "prompt": "x" * 5_000_000, "max_tokens": 1}
    status, _, out = raw(s, "POST", "/v1/completions", body, {"authorization": f"Bearer {k['good']}"})
    assert status in (413, 429) and "error" in json.loads(out)


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/v1/nope/" + "x" * 3000, 404, "unknown_route"),
        ("PUT", "/v1/chat/completions", 405, "method_not_allowed"),
        ("GET", "/v1/completions", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods_get_openai_errors(http_stack, method, path, status, code):
    s, k = http_stack
    got, hdrs, out = raw(s, method, path, b"{}", {"authorization": f"Bearer {k['good']}"})
    assert got == status and hdrs["content-type"].startswith("application/json"), out[:300]
    err = json.loads(out)["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert "x" * 100 not in err["message"] and len(out) < 1_000  # the client's path is not echoed
    if status == 405:
        assert "POST" in hdrs["allow"] and "POST" in err["message"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}',  # valid JSON, not text
        b'{"messages": [{"role": "user", "content": "hi"}], "\\udfff": 1}',
        b"[" * 50_000 + b"]" * 50_000,  # deeper than the decoder goes
    ],
)
def test_bodies_that_are_json_but_not_text_are_a_400(http_stack, body):
    s, k = http_stack
    status, _, out = raw(s, "POST", "/v1/chat/completions", body, {"authorization": f"Bearer {k['good']}"})
    assert status == 400, out[:300]
    assert json.loads(out)["error"]["param"] == "body"


def test_no_worker_is_503(tmp_path):
    cfg = make_config("synthetic")
    s = build_stack(tmp_path, cfg)
    try:
        s.start_gateway()  # its worker is not running
        s.start_envoy()
        status, hdrs, out = raw(s, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 503 and hdrs.get("retry-after") == "1"
        assert json.loads(out)["error"]["type"] == "service_unavailable"
    finally:
        s.stop()


def test_client_disconnect_aborts_the_request_on_the_worker(http_stack):
    s, k = http_stack
    before = s.worker_load()
    host, port = s.envoy.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True}
    ).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {k['good']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"data: ") < 4:  # a few tokens arrived: it is generating
        got += sock.recv(4096)
    sock.close()
    load, _ = s.wait_worker_idle(2.0)
    assert load.active_requests == 0 and load.engine_unfinished_requests == 0
    assert load.requests_aborted_total == before.requests_aborted_total + 1


def _grpc_stream(s, key, supersede_key, max_tokens=400):
    stub = s.gateway_stub("envoy")
    req = gpb.ExecuteRequest(
        task="type", supersede_key=supersede_key, sampling=gpb.SamplingParams(max_tokens=max_tokens)
    )
    return stub.Execute(req, metadata=[("authorization", f"Bearer {key}")], timeout=60)


def test_supersession_on_the_grpc_door_while_generating(http_stack):
    s, k = http_stack
    first = _grpc_stream(s, k["good"], "editor-1")
    tokens = 0
    for r in first:
        tokens += r.delta.tokens
        if tokens >= 3:
            break
    if s.config["gateway"].get("native_relay", {}).get("enabled"):
        # `make test-native`: the gateway hears of a relayed stream's tokens every report_interval_ms (100);
        # the trailer counts what it had heard of (docs/configuration.md).
        time.sleep(0.3)
    before = s.worker_load()
    other_tenant = list(_grpc_stream(s, k["other"], "editor-1", 2))  # another tenant's key: no effect
    second = list(_grpc_stream(s, k["good"], "editor-1", 5))
    assert second[-1].done.usage.completion_tokens == 5
    with pytest.raises(grpc.RpcError) as info:
        for _ in first:
            pass
    err = info.value
    assert err.code() == grpc.StatusCode.ABORTED and err.details().startswith("superseded")
    (detail,) = rpc_status.from_call(err).details
    info_msg = error_details_pb2.ErrorInfo()
    detail.Unpack(info_msg)
    assert info_msg.reason == "SUPERSEDED"
    assert int(dict(err.trailing_metadata())["igw-completion-tokens"]) >= 3
    assert other_tenant[-1].done.usage.completion_tokens == 2
    load, _ = s.wait_worker_idle(2.0)
    assert load.requests_aborted_total == before.requests_aborted_total + 1


def test_supersession_of_a_queued_request_never_reaches_the_worker(http_stack):
    s, k = http_stack
    blockers = [_grpc_stream(s, k["other"], "", 60) for _ in range(4)]  # the worker's 4 slots are taken
    for b in blockers:
        next(iter(b))
    before = s.worker_load()
    queued = _grpc_stream(s, k["good"], "editor-2", 5)
    results = {}

    def drain():
        try:
            results["queued"] = list(queued)
        except grpc.RpcError as err:
            results["queued"] = err

    t = threading.Thread(target=drain)
    t.start()
    time.sleep(0.3)
    assert s.worker_load().requests_total == before.requests_total  # still queued
    newer = _grpc_stream(s, k["good"], "editor-2", 5)
    t.join(10)
    assert isinstance(results["queued"], grpc.RpcError) and results["queued"].code() == grpc.StatusCode.ABORTED
    for b in blockers:
        b.cancel()
    assert list(newer)[-1].done.usage.completion_tokens == 5
    # The superseded one never ran: only the newer one reached the worker after the blockers.
    assert s.worker_load().requests_total == before.requests_total + 1


def test_supersession_on_the_http_door(http_stack):
    s, k = http_stack
    c = client(s, k["good"])
    headers = {"x-igw-supersede-key": "editor-3"}
    first = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=400, stream=True, extra_headers=headers
    )
    it = iter(first)
    next(it)
    next(it)
    second = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "ab"}], max_tokens=3, extra_headers=headers
    )
    assert second.usage.completion_tokens == 3
    with pytest.raises(openai.APIError) as info:
        for _ in it:
            pass
    assert "superseded" in str(info.value)
    # Non-streaming: the older request gets 409.
    results = {}

    def older():
        try:
            c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=400,
                extra_headers={"x-igw-supersede-key": "editor-4"},
            )
        except openai.APIStatusError as err:
            results["status"] = err.status_code

    t = threading.Thread(target=older)
    t.start()
    time.sleep(0.5)
    c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "y"}],
        max_tokens=1,
        extra_headers={"x-igw-supersede-key": "editor-4"},
    )
    t.join(10)
    assert results["status"] == 409


def test_answered_http_requests_are_counted_ok(http_stack):
    """A door that stops reading after the answer's last event closes the run: that is success, not a cancel."""
    from tests.integration.test_observability import delta, scrape

    s, k = http_stack
    metrics = s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    c = client(s, k["other"])
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count me"}], max_tokens=3)
    list(c.completions.create(model=MODEL, prompt="count me", max_tokens=3, stream=True))
    after = scrape(metrics)
    assert delta(before, after, "igw_requests_total", code="OK") == 2
    assert delta(before, after, "igw_requests_total", code="CANCELLED") == 0
    assert delta(before, after, "igw_aborts_total") == 0
