"""Who may call: API keys (issued by igw-keys, reloaded live) and JWTs verified by Envoy.

Real processes: a synthetic worker, gateways, Envoy. The engine does not
matter to authentication; the vLLM path is covered in test_e2e_vllm.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.v1 import gateway_pb2 as gpb
from tests.conftest import build_stack, make_config

BIN = Path(sys.executable).parent
MODEL = "smollm2-135m-instruct"


def igw_keys(*args: str) -> str:
    r = subprocess.run([str(BIN / "igw-keys"), *args], capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.strip()


def call(stub, key: str | None = None, header: str = "authorization", task: str = "hi", max_tokens: int = 3,
         extra_md: tuple = ()):
    md = list(extra_md)
    if key is not None:
        md.append((header, f"Bearer {key}" if header == "authorization" else key))
    return list(stub.Execute(gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=max_tokens)),
                             metadata=md, timeout=20))


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
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 500}},
                      gateway={"auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2}})
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    yield s, keys, {"good": good, "other": other, "revoked": revoked}
    s.stop()


def test_key_statuses(keyed):
    s, _, k = keyed
    stub = s.gateway_stub("envoy")
    assert code_of(lambda: call(stub))[0] == grpc.StatusCode.UNAUTHENTICATED
    forged = "igw_" + k["good"].split("_")[1] + "_" + "A" * 43  # right id, wrong secret
    for bad in (forged, "igw_zzzzzzzzzzzz_" + "B" * 43, "not-a-key"):
        code, msg = code_of(lambda: call(stub, bad))
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


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jwt")
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (tmp / "edge.secret").write_text("edge-" + base64.b32encode(__import__("os").urandom(20)).decode())
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 500}}, gateway={"auth": {
        "mode": "jwt", "jwks_file": str(tmp / "jwks.json"), "edge_secret_file": str(tmp / "edge.secret"),
        "jwt_issuer": "https://issuer.test", "jwt_audiences": ["igw"], "tenant_claim": "org"}})
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    yield s, signing
    s.stop()


def token(key, **over) -> str:
    now = int(time.time())
    claims = {"iss": "https://issuer.test", "aud": "igw", "sub": "alice", "org": "acme", "iat": now, "exp": now + 300}
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


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
    for bad, want in ((token(signing, iat=now - 900, exp=now - 600), grpc.StatusCode.UNAUTHENTICATED),
                      (token(other), grpc.StatusCode.UNAUTHENTICATED),
                      (token(signing, aud="someone-else"), grpc.StatusCode.PERMISSION_DENIED),
                      (token(signing, iss="https://evil.test"), grpc.StatusCode.UNAUTHENTICATED)):
        code, msg = code_of(lambda: call(stub, bad))
        assert code == want and "Jwt" in msg, msg
    assert code_of(lambda: call(stub))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_forged_claims_rejected(jwt_stack):
    s, signing = jwt_stack
    forged = base64.urlsafe_b64encode(json.dumps({"org": "victim", "sub": "mallory"}).encode()).decode().rstrip("=")
    # Straight to the gateway port, with claim headers and a guessed edge secret: rejected.
    direct = s.gateway_stub("gateway")
    for md in ((("x-jwt-payload", forged),),
               (("x-jwt-payload", forged), ("x-igw-edge-secret", "guess"))):
        code, msg = code_of(lambda: call(direct, extra_md=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "edge proxy" in msg
    # Through Envoy with a valid token plus forged headers: Envoy replaces them, the tenant is the token's.
    quota = s.gateway_stub("envoy").GetQuota(
        gpb.GetQuotaRequest(), timeout=5,
        metadata=[("authorization", f"Bearer {token(signing)}"), ("x-jwt-payload", forged),
                  ("x-igw-edge-secret", "guess")])
    assert quota.tenant == "acme"
