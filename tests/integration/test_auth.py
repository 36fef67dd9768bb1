"""Who may call: API keys (issued by igw-keys, reloaded live) and JWTs verified by Envoy.

Real processes: a synthetic worker, gateways, Envoy. The engine does not
matter to authentication; the vLLM path is covered in test_e2e_vllm.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.keys import KeyEntry, KeyFile, hash_key, read_key_file, write_key_file
from gateway.v1 import gateway_pb2 as gpb
from igw_common import config
from igw_common.config import ConfigError
from tests.helpers import build_stack, igw_keys, make_config

BIN = Path(sys.executable).parent
MODEL = "smollm2-135m-instruct"


def call(
    stub,
    key: str | None = None,
    header: str = "authorization",
    task: str = "hi",
    max_tokens: int = 3,
    extra_md: tuple = (),
):
    md = list(extra_md)
    if key is not None:
        md.append((header, f"Bearer {key}" if header == "authorization" else key))
    return list(
        stub.Execute(
            gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=max_tokens)), metadata=md, timeout=20
        )
    )


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "keys.yaml"
    good = igw_keys("issue", "--file", str(keys), "--tenant", "acme", "--model", MODEL)
    other = igw_keys("issue", "--file", str(keys), "--tenant", "acme", "--model", "some-other-model")
    revoked = igw_keys("issue", "--file", str(keys), "--tenant", "acme")
    igw_keys("revoke", "--file", str(keys), revoked.split("_")[1])
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 500}},
        gateway={"auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2}},
    )
    s = build_stack(tmp, cfg)
    try:  # a process that fails to come up must not leave the others running
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        yield s, keys, {"good": good, "other": other, "revoked": revoked}
    finally:
        s.stop()


def test_key_statuses(keyed):
    s, _, k = keyed
    stub = s.gateway_stub("envoy")
    assert code_of(lambda: call(stub))[0] == grpc.StatusCode.UNAUTHENTICATED
    forged = "igw_" + k["good"].split("_")[1] + "_" + "A" * 43  # right id, wrong secret
    for bad in (forged, "igw_zzzzzzzzzzzz_" + "B" * 43, "not-a-key"):
        code, msg = code_of(lambda bad=bad: call(stub, bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED and msg == "the API key is not valid"
    code, msg = code_of(lambda: call(stub, k["revoked"]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in msg
    code, msg = code_of(lambda: call(stub, k["other"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and msg.startswith("model:") and MODEL in msg
    assert call(stub, k["good"])[-1].done.usage.completion_tokens == 3
    assert call(stub, k["good"], header="x-api-key")[-1].done.usage.completion_tokens == 3
    # Basic auth or an empty bearer is not an API key.
    code, _ = code_of(lambda: call(stub, extra_md=(("authorization", "Basic dXNlcjpwYXNz"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_list_models_needs_a_key(keyed):
    s, _, k = keyed
    stub = s.gateway_stub("envoy")
    code, _ = code_of(lambda: stub.ListModels(gpb.ListModelsRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    md = [("authorization", f"Bearer {k['good']}")]
    assert [m.name for m in stub.ListModels(gpb.ListModelsRequest(), metadata=md, timeout=5).models] == [MODEL]


def test_no_secret_in_logs_or_errors(keyed):
    s, keys, k = keyed
    import hashlib

    for key in k.values():
        try:
            call(s.gateway_stub("envoy"), key)
        except grpc.RpcError as err:
            assert key not in err.details()
    time.sleep(1.2)  # Envoy flushes its access log every second
    logs = "".join(p.read_text() for p in s.dir.glob("*.log"))
    for key in k.values():
        assert key not in logs
        assert key.split("_", 2)[2] not in logs  # the secret part (it may contain "_")
        assert hashlib.sha256(key.encode()).hexdigest() not in logs
    assert "igw_" not in keys.read_text()  # the key file holds hashes only


def test_key_added_and_revoked_without_restart(keyed):
    s, keys, k = keyed
    stub = s.gateway_stub("envoy")
    new = igw_keys("issue", "--file", str(keys), "--tenant", "beta")
    deadline = time.monotonic() + 5
    while True:  # the file watch polls every 0.2 s in this test
        try:
            call(stub, new)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
            time.sleep(0.1)
    igw_keys("revoke", "--file", str(keys), new.split("_")[1])
    deadline = time.monotonic() + 5
    while True:
        try:
            call(stub, new)
            assert time.monotonic() < deadline, "revocation did not take effect"
            time.sleep(0.1)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()
            break
    # SIGHUP reloads at once (and a broken file keeps the old keys).
    keys_text = keys.read_text()
    keys.write_text("keys: [this is not a mapping\n")
    s.procs["gateway"].send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert s.procs["gateway"].poll() is None
    assert call(stub, k["good"])[-1].done.usage.completion_tokens == 3  # old keys still in force
    assert "key file not reloaded" in s.log("gateway").read_text()
    keys.write_text(keys_text)
    s.procs["gateway"].send_signal(signal.SIGHUP)


# --- JWT -----------------------------------------------------------------------------

EDGE_SECRET = "edge-%REQ(:path)%-50%%-100%-\"'\\{x}$y#z!~" + base64.b32encode(os.urandom(20)).decode()


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jwt")
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    # `%` and friends: Envoy once took the secret as a header format string (`%REQ(...)%`
    # would have been expanded, a lone `%` refused); the injector sends it verbatim.
    # The trailing newline is what `echo secret > file` leaves: both sides drop it.
    (tmp / "edge.secret").write_text(EDGE_SECRET + "\n")
    (tmp / "edge.secret").chmod(0o600)
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 500}},
        gateway={
            "auth": {
                "mode": "jwt",
                "jwks_file": str(tmp / "jwks.json"),
                "edge_secret_file": str(tmp / "edge.secret"),
                "jwt_issuer": "https://issuer.test",
                "jwt_audiences": ["igw"],
                "tenant_claim": "org",
            },
            "quota": {"default_tenant_limits": {"requests_per_minute": 1000, "concurrent_streams": 50}},
        },
    )
    s = build_stack(tmp, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        yield s, signing
    finally:
        s.stop()


def token(key, **over) -> str:
    now = int(time.time())
    claims = {"iss": "https://issuer.test", "aud": "igw", "sub": "alice", "org": "acme", "iat": now, "exp": now + 300}
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def test_jwt_tenants_get_default_limits_and_a_bounded_label(jwt_stack):
    """A tenant named only by a JWT claim is subject to gateway.quota.default_tenant_limits, and is counted
    under the metric label "other": one claim value per user cannot grow the label sets."""
    s, signing = jwt_stack
    stub = s.gateway_stub("envoy")
    for org in ("acme", "user-1", "user-2"):
        assert call(stub, token(signing, org=org))[-1].done.usage.completion_tokens == 3
    quota = stub.GetQuota(gpb.GetQuotaRequest(), metadata=[("authorization", f"Bearer {token(signing)}")], timeout=5)
    (budget,) = quota.budgets
    assert (budget.scope, budget.name, budget.requests_per_minute, budget.concurrent_streams) == (
        "tenant",
        "acme",
        1000,
        50,
    )
    # Charged: a stream of acme's that is open holds one of its 50 (requests refill too fast to see here).
    md = [("authorization", f"Bearer {token(signing)}")]
    held = stub.Execute(gpb.ExecuteRequest(task="hold", sampling=gpb.SamplingParams(max_tokens=1500)), metadata=md)
    try:
        assert next(held).WhichOneof("event") == "started"
        (budget,) = stub.GetQuota(gpb.GetQuotaRequest(), metadata=md, timeout=5).budgets
        assert budget.concurrent_streams_in_use == 1
    finally:
        held.cancel()
    import urllib.request

    metrics = (
        urllib.request.urlopen(f"http://{s.config['gateway']['metrics_listen']}/metrics", timeout=5).read().decode()
    )
    tenants = set(re.findall(r'igw_requests_total\{[^}]*tenant="([^"]*)"', metrics))
    assert tenants == {"other"}, tenants


def test_jwt_verified_by_envoy(jwt_stack):
    s, signing = jwt_stack
    stub = s.gateway_stub("envoy")
    out = call(stub, token(signing))
    assert out[-1].done.usage.completion_tokens == 3
    quota = stub.GetQuota(gpb.GetQuotaRequest(), metadata=[("authorization", f"Bearer {token(signing)}")], timeout=5)
    assert quota.tenant == "acme"  # from the configured claim

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # Envoy allows 60 s of clock skew, so "expired" here is 10 minutes ago.
    # Envoy answers 401 (UNAUTHENTICATED) for a token it cannot verify and 403
    # (PERMISSION_DENIED) for a valid token not meant for us; its messages name the "Jwt".
    now = int(time.time())
    for bad, want in (
        (token(signing, iat=now - 900, exp=now - 600), grpc.StatusCode.UNAUTHENTICATED),
        (token(other), grpc.StatusCode.UNAUTHENTICATED),
        (token(signing, aud="someone-else"), grpc.StatusCode.PERMISSION_DENIED),
        (token(signing, iss="https://evil.test"), grpc.StatusCode.UNAUTHENTICATED),
    ):
        code, msg = code_of(lambda bad=bad: call(stub, bad))
        assert code == want and "Jwt" in msg, msg
    assert code_of(lambda: call(stub))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_forged_claims_rejected(jwt_stack):
    s, signing = jwt_stack
    forged = base64.urlsafe_b64encode(json.dumps({"org": "victim", "sub": "mallory"}).encode()).decode().rstrip("=")
    # Straight to the gateway port, with claim headers and a guessed edge secret: rejected.
    direct = s.gateway_stub("gateway")
    for md in ((("x-jwt-payload", forged),), (("x-jwt-payload", forged), ("x-igw-edge-secret", "guess"))):
        code, msg = code_of(lambda md=md: call(direct, extra_md=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "edge proxy" in msg
    # Through Envoy with a valid token plus forged headers: Envoy replaces them, the tenant is the token's.
    quota = s.gateway_stub("envoy").GetQuota(
        gpb.GetQuotaRequest(),
        timeout=5,
        metadata=[
            ("authorization", f"Bearer {token(signing)}"),
            ("x-jwt-payload", forged),
            ("x-igw-edge-secret", "guess"),
        ],
    )
    assert quota.tenant == "acme"


def test_edge_secret_out_of_config_dump_and_verbatim(jwt_stack):
    """The secret reaches the gateway byte for byte (`%` and all) but is in no file we write
    and not in Envoy's /config_dump, which anyone on the Envoy host's loopback can read."""
    s, signing = jwt_stack
    # The gateway compares the header with the file's secret exactly: an answer means intact.
    quota = s.gateway_stub("envoy").GetQuota(
        gpb.GetQuotaRequest(), timeout=5, metadata=[("authorization", f"Bearer {token(signing)}")]
    )
    assert quota.tenant == "acme"
    secret_file = Path(s.config["gateway"]["auth"]["edge_secret_file"])
    dumps = {}
    for query in ("", "?include_eds"):
        with urllib.request.urlopen(f"http://{s.envoy_admin}/config_dump{query}", timeout=5) as r:
            dumps[query] = r.read().decode()
    for text in dumps.values():
        assert "credential_injector" in text  # the dump is the real one
        assert EDGE_SECRET not in text and EDGE_SECRET.split("~")[-1] not in text
    # The bootstrap names the file; only the operator's file holds the secret.
    bootstrap = (s.dir / "envoy.yaml").read_text()
    assert str(secret_file.resolve()) in bootstrap and EDGE_SECRET.split("~")[-1] not in bootstrap
    for f in s.dir.iterdir():
        if f.is_file() and f != secret_file:
            assert EDGE_SECRET.split("~")[-1] not in f.read_text(errors="replace"), f


def test_tenant_claim_bounded(jwt_stack):
    """A claim value becomes a quota key, a queue and a log field: bounded, and never echoed."""
    s, signing = jwt_stack
    stub = s.gateway_stub("envoy")

    def tenant_of(org):
        return stub.GetQuota(
            gpb.GetQuotaRequest(), timeout=5, metadata=[("authorization", f"Bearer {token(signing, org=org)}")]
        ).tenant

    ok = "a" * 128
    assert tenant_of(ok) == ok
    assert tenant_of("team-1.eu:prod@acme_x") == "team-1.eu:prod@acme_x"
    code, msg = code_of(lambda: tenant_of("b" * 129))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "at most 128" in msg and "bbbb" not in msg
    for bad in ("acme corp", "acme\nx", "acme/../x", "ac\u00e9me", "acme\x00", '{"a":1}'):
        code, msg = code_of(lambda bad=bad: tenant_of(bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not a valid tenant name" in msg, (bad, msg)
        assert "acme" not in msg
    # Not a string at all: named as missing, as before.
    code, msg = code_of(lambda: tenant_of(12))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "`org` claim" in msg


def test_jwt_mode_needs_audiences(tmp_path):
    base = {"mode": "jwt", "jwks_file": "j.json", "edge_secret_file": "e.secret", "jwt_issuer": "https://i.test"}
    for auds in ([], [""]):
        with pytest.raises(ConfigError) as info:
            config.parse({"gateway": {"auth": {**base, "jwt_audiences": auds}}})
        assert "gateway.auth.jwt_audiences" in str(info.value)
    assert config.parse({"gateway": {"auth": {**base, "jwt_audiences": ["igw"]}}}).gateway.auth.jwt_audiences == ["igw"]


def test_unusable_edge_secret_refused_at_render(tmp_path):
    """Envoy and the gateway must read the same secret; one that would not survive as a
    header value is refused up front, naming the file and never echoing its content."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": []}))
    secret = tmp_path / "edge.secret"
    cfg = make_config(
        "synthetic",
        gateway={
            "auth": {
                "mode": "jwt",
                "jwks_file": str(tmp_path / "jwks.json"),
                "edge_secret_file": str(secret),
                "jwt_issuer": "https://issuer.test",
                "jwt_audiences": ["igw"],
            }
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    render = [sys.executable, "-m", "gateway.envoy_bootstrap", "--config", str(path)]
    for bad in (
        "shortsecret\n",
        "with a space in the middle 0123456789",
        " leadingblank0123456789abcdef",
        "tab\tinside0123456789abcdef",
        "caf\u00e9-0123456789abcdef",
    ):
        secret.write_text(bad)
        r = subprocess.run(render, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and str(secret) in r.stderr and "at least 16 visible ASCII" in r.stderr, r.stderr
        assert bad.strip()[:8] not in r.stderr
    secret.unlink()
    r = subprocess.run(render, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot read" in r.stderr
    secret.write_text("0123456789abcdef%\r\n")
    r = subprocess.run(render, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "0123456789abcdef" not in r.stdout and str(secret) in r.stdout


# --- the key file ----------------------------------------------------------------------


def test_concurrent_issues_all_land(tmp_path):
    """Eight `igw-keys issue` at once: the lock serializes them, so no issue is lost."""
    keys = tmp_path / "keys.yaml"
    procs = [
        subprocess.Popen(
            [str(BIN / "igw-keys"), "issue", "--file", str(keys), "--tenant", f"t{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    issued = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        issued.append(out.strip())
    kf = read_key_file(keys)
    assert len(kf.keys) == 8
    for key in issued:
        entry = kf.keys[key.split("_")[1]]
        assert entry.sha256 == hash_key(key)
    assert {e.tenant for e in kf.keys.values()} == {f"t{i}" for i in range(8)}
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # A revoke and a tenant change later still work under the lock.
    igw_keys("revoke", "--file", str(keys), issued[0].split("_")[1])
    igw_keys("tenant", "--file", str(keys), "t1", "--rpm", "5")
    kf = read_key_file(keys)
    assert kf.keys[issued[0].split("_")[1]].revoked and kf.tenants["t1"].limits.requests_per_minute == 5


_watch: dict = {"dir": None, "seen": []}


def _audit(event, args):
    # At every file operation of write_key_file, note the mode of every file in the directory.
    d = _watch["dir"]
    if d is None or event not in ("open", "os.chmod", "os.rename", "os.replace", "os.remove"):
        return
    _watch["dir"] = None  # no recursion through our own listdir/stat
    try:
        for name in os.listdir(d):
            try:
                _watch["seen"].append((event, name, stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode)))
            except FileNotFoundError:
                pass
    finally:
        _watch["dir"] = d


def test_key_file_never_readable_by_others(tmp_path):
    """Even with umask 000, no file the writer creates is ever readable by group or others:
    checked at each step (create, fdopen, replace) while write_key_file runs."""
    sys.addaudithook(_audit)  # cannot be removed; inert once _watch["dir"] is None again
    old = os.umask(0)
    try:
        _watch.update(dir=str(tmp_path), seen=[])
        kf = KeyFile()
        for i in range(3):
            kf.keys[f"k{i:011d}"] = KeyEntry(sha256="0" * 64, tenant=f"t{i}")
            write_key_file(tmp_path / "keys.yaml", kf)
    finally:
        _watch["dir"] = None
        os.umask(old)
    seen = _watch["seen"]
    assert any(name.endswith(".tmp") for _, name, _ in seen), "the temporary file was never observed"
    assert all(mode & 0o077 == 0 for _, _, mode in seen), [s for s in seen if s[2] & 0o077]
    assert [p.name for p in tmp_path.iterdir()] == ["keys.yaml"]
    assert len(read_key_file(tmp_path / "keys.yaml").keys) == 3
