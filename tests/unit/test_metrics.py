"""The gateway's metrics keep the children they hand out, and still export what was counted."""

from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics


def test_labels_hands_out_the_same_child_and_exports_its_count():
    m = GatewayMetrics()
    a = m.requests.labels("model-a", "tenant-a", "OK", "default")
    assert m.requests.labels("model-a", "tenant-a", "OK", "default") is a
    assert m.requests.labels("model-a", "tenant-a", "CANCELLED", "default") is not a
    a.inc()
    m.requests.labels(model="model-a", tenant="tenant-a", code="OK", pool="default").inc()  # by name too
    text = generate_latest(m.registry).decode()
    assert 'igw_requests_total{code="OK",model="model-a",pool="default",tenant="tenant-a"} 2.0' in text
