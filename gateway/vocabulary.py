"""Words the gateway's modules share, defined once: priorities and finish reasons.

Mappings to and from the wire enums live here too, so a new finish reason or
priority is one edit, not four.
"""

from __future__ import annotations

from gateway.v1 import gateway_pb2 as gpb
from igw_worker_api.v1 import worker_pb2 as wpb

# Scheduling classes, highest first. A key's `priority_max` is one of these.
INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES = (INTERACTIVE, BATCH)

PRIORITY_FROM_WIRE = {gpb.PRIORITY_UNSPECIFIED: None, gpb.PRIORITY_INTERACTIVE: INTERACTIVE, gpb.PRIORITY_BATCH: BATCH}


def priority_allowed(asked: str, cap: str) -> bool:
    """A key capped at ``cap`` may ask for ``asked`` (the same class or a lower one)."""
    return PRIORITIES.index(asked) >= PRIORITIES.index(cap)


# How a model may use a request's tools (gateway.request.TOOL_CHOICES).
TOOL_CHOICE_TO_WORKER = {
    "auto": wpb.TOOL_CHOICE_AUTO,
    "none": wpb.TOOL_CHOICE_NONE,
    "required": wpb.TOOL_CHOICE_REQUIRED,
    "named": wpb.TOOL_CHOICE_NAMED,
}

# Why generation ended.
STOP = "stop"
LENGTH = "length"
TOOL_CALLS = "tool_calls"
FINISH_FROM_WORKER = {
    wpb.FINISH_REASON_STOP: STOP,
    wpb.FINISH_REASON_LENGTH: LENGTH,
    wpb.FINISH_REASON_TOOL_CALLS: TOOL_CALLS,
}
FINISH_TO_PUBLIC = {
    STOP: gpb.FINISH_REASON_STOP,
    LENGTH: gpb.FINISH_REASON_LENGTH,
    TOOL_CALLS: gpb.FINISH_REASON_TOOL_CALLS,
}
