"""Placement: affinity, least loaded, weighted pools, claims (no processes)."""

from __future__ import annotations

from gateway.core.placement import Router, affinity_key
from igw_worker_api.v1 import worker_pb2 as wpb


class W:
    def __init__(self, address, load):
        self.address, self.outstanding_tokens = address, load


def test_router_affinity_beats_least_loaded():
    r = Router(10)
    busy, idle = W("a", 500), W("b", 0)
    assert r.choose("s:1", [busy, idle]) is idle  # least loaded, remembered
    idle.outstanding_tokens = 900
    assert r.choose("s:1", [busy, idle]) is idle  # affinity while it has room
    assert r.choose("s:1", [busy]) is busy  # not a candidate (full): least loaded elsewhere
    assert r.choose("", [busy, W("c", 1)]).address == "c"


def test_affinity_key_uses_session_or_prefix_within_a_tenant():
    msgs = [wpb.ChatMessage(role="system", content="ctx"), wpb.ChatMessage(role="user", content="q1")]
    assert affinity_key("t", "abc", msgs) == affinity_key("t", "abc", [])
    assert affinity_key("t", "abc", msgs) != affinity_key("other", "abc", msgs)  # ids are per tenant
    same_prefix = [msgs[0], wpb.ChatMessage(role="user", content="q1")]
    assert affinity_key("t", "", msgs) == affinity_key("t", "", same_prefix)
    other = [wpb.ChatMessage(role="system", content="other"), msgs[1]]
    assert affinity_key("t", "", msgs) != affinity_key("t", "", other)
