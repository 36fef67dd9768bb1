"""Server-side sessions against a real redis-server, two gateway processes and the synthetic engine.

The synthetic engine counts a prompt as one token per word plus 2 per message plus 1, so the prompt
tokens a turn reports prove exactly which history the worker saw."""

from __future__ import annotations

import json
import threading
import time

import grpc
import openai
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, igw_keys, make_config, new_key
from tests.integration.test_http_api import raw
from tests.state_helpers import ask, md, start_replica

MODEL = "smollm2-135m-instruct"


def synthetic_prompt_tokens(messages: list[tuple[str, str]]) -> int:
    return sum(len(c.split()) + 2 for _, c in messages) + 1


@pytest.fixture(scope="module")
def sessions(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("sessions")
    keys = tmp / "keys.yaml"
    igw_keys("tenant", "--file", str(keys), "unused")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 50, "max_context_tokens": 1_000}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_server.url},
            "sessions": {"enabled": True, "store": "redis", "context_margin_tokens": 16},
        },
    )
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    other = start_replica(s, "gateway-b")
    yield s, keys, other
    s.stop()


def get(stub, key, sid):
    return stub.GetSession(gpb.GetSessionRequest(session_id=sid), metadata=md(key), timeout=5)


def test_a_conversation_sends_only_the_new_turn(sessions):
    s, keys, other = sessions
    key = new_key(keys, "t-conv")
    stub = s.gateway_stub("gateway")
    t1 = ask(stub, key, session_id="c1", task="my name is Ada", sampling=gpb.SamplingParams(max_tokens=3))
    assert (t1.started.session_history_turns, t1.started.session_turns_dropped) == (0, 0)
    assert t1.started.prompt_tokens == synthetic_prompt_tokens([("user", "my name is Ada")])
    # The next turn goes to the other replica: the history is in Redis, not in a gateway.
    t2 = ask(other.stub(), key, session_id="c1", task="what is my name?", sampling=gpb.SamplingParams(max_tokens=4))
    assert t2.started.session_history_turns == 1
    seen = [("user", "my name is Ada"), ("assistant", t1.text), ("user", "what is my name?")]
    assert t2.started.prompt_tokens == synthetic_prompt_tokens(seen)
    stored = get(stub, key, "c1")
    assert [(list((m.role, m.content) for m in t.messages), t.answer) for t in stored.turns] == [
        ([("user", "my name is Ada")], t1.text),
        ([("user", "what is my name?")], t2.text),
    ]
    assert 0 < stored.expires_in_s <= 86_400


def test_system_messages_stay_first_and_context_is_not_stored(sessions):
    s, keys, _ = sessions
    key = new_key(keys, "t-sys")
    stub = s.gateway_stub("gateway")
    first = [gpb.ChatMessage(role="system", content="answer in French"), gpb.ChatMessage(role="user", content="hi")]
    t1 = ask(stub, key, session_id="sys", messages=first, sampling=gpb.SamplingParams(max_tokens=2))
    ctx = gpb.ExecuteRequest().context
    ctx.update({"file": "main.go"})
    t2 = ask(stub, key, session_id="sys", task="and now?", context=ctx, sampling=gpb.SamplingParams(max_tokens=2))
    context_msg = "Context from the caller, as JSON:\n" + json.dumps({"file": "main.go"}, separators=(",", ":"))
    seen = [
        ("system", context_msg),
        ("system", "answer in French"),
        ("user", "hi"),
        ("assistant", t1.text),
        ("user", "and now?"),
    ]
    assert t2.started.prompt_tokens == synthetic_prompt_tokens(seen)
    stored = get(stub, key, "sys")
    assert [(m.role, m.content) for m in stored.system_messages] == [("system", "answer in French")]
    assert [[m.content for m in t.messages] for t in stored.turns] == [["hi"], ["and now?"]]


def test_a_cancelled_or_failed_turn_leaves_the_session_as_it_was(sessions):
    s, keys, _ = sessions
    key = new_key(keys, "t-cancel")
    stub = s.gateway_stub("gateway")
    ask(stub, key, session_id="keep", task="first turn", sampling=gpb.SamplingParams(max_tokens=2))
    before = get(stub, key, "keep")
    call = stub.Execute(
        gpb.ExecuteRequest(session_id="keep", task="never stored", sampling=gpb.SamplingParams(max_tokens=200)),
        metadata=md(key),
        timeout=60,
    )
    got = [next(call), next(call)]  # started and a delta: it was generating
    assert got[0].HasField("started") and got[1].HasField("delta")
    call.cancel()
    # A turn that fails at admission (max_tokens larger than the model's context) writes nothing either.
    with pytest.raises(grpc.RpcError) as err:
        ask(stub, key, session_id="keep", task="too long", sampling=gpb.SamplingParams(max_tokens=1_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.3)
    after = get(stub, key, "keep")
    assert list(after.turns) == list(before.turns) and len(before.turns) == 1


def test_history_is_trimmed_from_the_oldest_turn_and_reported(sessions):
    s, keys, _ = sessions
    key = new_key(keys, "t-trim")
    stub = s.gateway_stub("gateway")
    long_turn = " ".join(f"word{i}" for i in range(150))  # ~1 KB: estimated ~380 tokens, measured ~150
    reports = []
    for i in range(8):
        a = ask(stub, key, session_id="long", task=f"{i} {long_turn}", sampling=gpb.SamplingParams(max_tokens=20))
        reports.append((a.started.session_history_turns, a.started.session_turns_dropped, a.started.prompt_tokens))
        assert a.started.prompt_tokens + 20 <= 1_000  # always fits the model's 1,000-token context
    dropped = sum(d for _, d, _ in reports)
    assert dropped > 0, reports
    # History grows until it no longer fits, then each turn drops the oldest: history + this turn fit.
    assert reports[0][:2] == (0, 0) and reports[1][:2] == (1, 0)
    kept = get(stub, key, "long")
    assert len(kept.turns) == 8 - dropped
    assert kept.turns[-1].messages[0].content.startswith("7 ")
    # The oldest turns went first.
    assert kept.turns[0].messages[0].content.startswith(f"{dropped} ")


def test_sessions_belong_to_their_tenant(sessions):
    s, keys, _ = sessions
    mine, theirs = new_key(keys, "t-owner"), new_key(keys, "t-intruder")
    stub = s.gateway_stub("gateway")
    ask(stub, mine, session_id="private", task="secret plans", sampling=gpb.SamplingParams(max_tokens=2))
    for rpc in (stub.GetSession, stub.DeleteSession):
        req = (gpb.GetSessionRequest if rpc is stub.GetSession else gpb.DeleteSessionRequest)(session_id="private")
        with pytest.raises(grpc.RpcError) as err:
            rpc(req, metadata=md(theirs), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "secret" not in err.value.details()
    # The intruder's own turn with that id starts its own, empty session.
    t = ask(stub, theirs, session_id="private", task="hello", sampling=gpb.SamplingParams(max_tokens=2))
    assert t.started.session_history_turns == 0
    assert len(get(stub, mine, "private").turns) == 1
    stub.DeleteSession(gpb.DeleteSessionRequest(session_id="private"), metadata=md(mine), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        get(stub, mine, "private")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(get(stub, theirs, "private").turns) == 1


def test_two_turns_at_once_both_land(sessions):
    s, keys, other = sessions
    key = new_key(keys, "t-race")
    stubs = [s.gateway_stub("gateway"), other.stub()]
    barrier = threading.Barrier(2)

    def turn(i):
        barrier.wait()
        ask(stubs[i], key, session_id="race", task=f"parallel {i}", sampling=gpb.SamplingParams(max_tokens=5))

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(t.messages[0].content for t in get(stubs[0], key, "race").turns) == ["parallel 0", "parallel 1"]


def test_http_routes_and_the_openai_door(sessions):
    s, keys, _ = sessions
    key, stranger = new_key(keys, "t-http-sess"), new_key(keys, "t-http-other")
    auth = {"authorization": f"Bearer {key}", "x-igw-session-id": "web"}
    for content in ("hello there", "and again"):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3}
        status, _, out = raw(s, "POST", "/v1/chat/completions", body, auth)
        assert status == 200, out
    status, _, out = raw(s, "GET", "/v1/sessions/web", None, {"authorization": f"Bearer {key}"})
    got = json.loads(out)
    assert status == 200 and [t["messages"][0]["content"] for t in got["turns"]] == ["hello there", "and again"]
    assert all(t["answer"] for t in got["turns"])
    status, _, out = raw(s, "GET", "/v1/sessions/web", None, {"authorization": f"Bearer {stranger}"})
    assert status == 404 and json.loads(out)["error"]["code"] == "session_not_found"
    status, _, _ = raw(s, "DELETE", "/v1/sessions/web", None, {"authorization": f"Bearer {key}"})
    assert status == 200
    status, _, _ = raw(s, "GET", "/v1/sessions/web", None, {"authorization": f"Bearer {key}"})
    assert status == 404


def test_sessions_off_is_unimplemented_and_session_id_only_routes(tmp_path):
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 200}})
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        ask(stub, session_id="x", task="one", sampling=gpb.SamplingParams(max_tokens=2))
        two = ask(stub, session_id="x", task="two", sampling=gpb.SamplingParams(max_tokens=2))
        assert two.started.session_history_turns == 0
        assert two.started.prompt_tokens == synthetic_prompt_tokens([("user", "two")])
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSession(gpb.GetSessionRequest(session_id="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "gateway.sessions.enabled" in err.value.details()
    finally:
        s.stop()


def test_session_overhead_per_turn(tmp_path, redis_server):
    """The same 20-turn conversation, the history kept by the gateway in Redis (the client sends one turn)
    vs kept by the client (it sends them all, sessions off), alternating turn by turn on one worker.
    Prints the per-turn figures (pytest -s); the overhead must stay within a few milliseconds."""
    base = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 1000}})
    with_sessions = {
        **base,
        "gateway": {
            **base["gateway"],
            "quota": {"store": "redis", "redis_url": redis_server.url},
            "sessions": {"enabled": True, "store": "redis", "redis_key_prefix": "igw:s-bench:"},
        },
    }
    plain = make_config("synthetic", worker=base["worker"])
    plain["gateway"]["workers"] = base["gateway"]["workers"]
    s = build_stack(tmp_path / "sessions", with_sessions)
    p = build_stack(tmp_path / "plain", plain)
    try:
        s.start_worker()
        s.start_gateway()
        p.start_gateway()
        on, off = s.gateway_stub("gateway"), p.gateway_stub("gateway")
        history: list[gpb.ChatMessage] = []
        t_on, t_off = [], []
        words = " ".join(f"w{i}" for i in range(60))
        for i in range(21):
            task = f"turn {i}: {words}"
            a = ask(on, session_id="bench", task=task, sampling=gpb.SamplingParams(max_tokens=2))
            b = ask(
                off,
                session_id="bench",
                messages=history + [gpb.ChatMessage(role="user", content=task)],
                sampling=gpb.SamplingParams(max_tokens=2),
            )
            assert a.started.prompt_tokens == b.started.prompt_tokens  # the worker saw the same conversation
            history += [gpb.ChatMessage(role="user", content=task), gpb.ChatMessage(role="assistant", content=b.text)]
            if i:  # the first call of each warms its connection
                t_on.append(a.total_s)
                t_off.append(b.total_s)
        med = lambda xs: sorted(xs)[len(xs) // 2] * 1000  # noqa: E731
        overhead = med(t_on) - med(t_off)
        print(
            f"\nSESSION OVERHEAD per turn: {med(t_on):.2f} ms with sessions (Redis) vs {med(t_off):.2f} ms "
            f"client-kept history; {overhead:+.2f} ms (median of {len(t_on)} turns)"
        )
        assert overhead < 25
    finally:
        p.stop()
        s.stop()


def test_sessions_store_tool_calls_and_results_as_turns(sessions):
    """A tool call in the answer and a tool result in the next turn are stored as they were (Redis)."""
    s, keys, _ = sessions
    key = new_key(keys, "t-tools")
    stub = s.gateway_stub("gateway")
    tools = [gpb.Tool(name="get_time")]
    sid = "tools-session"
    out = list(
        stub.Execute(
            gpb.ExecuteRequest(
                task="time?", session_id=sid, tools=tools, tool_choice=gpb.ToolChoice(function_name="get_time")
            ),
            metadata=md(key),
            timeout=30,
        )
    )
    call_id = next(tc.id for r in out if r.HasField("delta") for tc in r.delta.tool_calls if tc.id)
    result = gpb.ChatMessage(role="tool", tool_call_id=call_id, content="12:00")
    list(
        stub.Execute(
            gpb.ExecuteRequest(
                messages=[result], session_id=sid, tools=tools, sampling=gpb.SamplingParams(max_tokens=2)
            ),
            metadata=md(key),
            timeout=30,
        )
    )
    session = get(stub, key, sid)
    first, second = session.turns
    assert [(c.id, c.name, c.arguments_json) for c in first.answer_tool_calls] == [(call_id, "get_time", "{}")]
    assert second.messages[0].role == "tool" and second.messages[0].tool_call_id == call_id


def test_stored_responses_are_continued_read_back_and_deleted(sessions):
    """The Responses API's previous_response_id and store on Redis-kept sessions, with the real `openai`
    package: only the latest response continues, two rival continuations do not both land, ids are
    per tenant, and GET / DELETE /v1/responses/{id} read back and delete the conversation."""
    s, keys, _ = sessions
    key, stranger = new_key(keys, "t-resp"), new_key(keys, "t-resp-other")
    c = openai.OpenAI(base_url=f"http://{s.envoy}/v1", api_key=key, max_retries=0, timeout=30)
    first = c.responses.create(model=MODEL, input="my name is Ada", max_output_tokens=3)
    second = c.responses.create(
        model=MODEL, input="what is my name?", previous_response_id=first.id, max_output_tokens=4
    )
    seen = [("user", "my name is Ada"), ("assistant", first.output_text), ("user", "what is my name?")]
    assert second.usage.input_tokens == synthetic_prompt_tokens(seen)  # the worker saw the stored turn
    back = c.responses.retrieve(second.id)
    assert (back.id, back.output_text, back.usage.output_tokens) == (second.id, second.output_text, 4)
    assert back.status == "incomplete" and back.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.BadRequestError, match="latest"):  # no branches from an earlier response
        c.responses.create(model=MODEL, input="again", previous_response_id=first.id, max_output_tokens=2)
    # A streamed continuation: the id in response.created is the one it is stored under.
    events = list(
        c.responses.create(
            model=MODEL, input="and now?", previous_response_id=second.id, max_output_tokens=2, stream=True
        )
    )
    created, third = events[0].response.id, events[-1].response
    assert created == third.id and c.responses.retrieve(third.id).output_text == third.output_text
    # Two continuations of the same response at once: one is stored, the other is refused (409).
    results = []

    def rival(i):
        try:
            r = c.responses.create(model=MODEL, input=f"rival {i}", previous_response_id=third.id, max_output_tokens=5)
            results.append(r.id)
        except openai.APIStatusError as err:
            results.append(err.status_code)

    threads = [threading.Thread(target=rival, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results, key=str) == sorted([409, response_id_after(third.id)], key=str), results
    # Not stored: nothing to read back or continue.
    loose = c.responses.create(model=MODEL, input="forget me", store=False, max_output_tokens=2)
    for call in (
        lambda: c.responses.retrieve(loose.id),
        lambda: c.responses.create(model=MODEL, input="x", previous_response_id=loose.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    other = openai.OpenAI(base_url=f"http://{s.envoy}/v1", api_key=stranger, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):  # another tenant's
        other.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="x", previous_response_id=second.id)
    c.responses.delete(first.id)  # the whole conversation goes
    for rid in (first.id, second.id, third.id):
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(rid)


def response_id_after(rid: str) -> str:
    """The id the turn after ``rid`` is stored under."""
    head, _, number = rid.rpartition(".")
    return f"{head}.{int(number) + 1}"
