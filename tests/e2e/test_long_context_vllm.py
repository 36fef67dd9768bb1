"""An agent's first turn fits the embedded default: the worker settings ``make run`` ships
(config/default.yaml: a 32,768-token window by YaRN rope scaling of SmolLM2's 8,192) serve a prompt past
the model's own window, through Envoy, streamed with the `anthropic` package as Claude Code sends it.
Prints the prefill time (``pytest -s``: LONG PROMPT)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import pytest
import yaml

from tests.helpers import make_config, running_stack

pytestmark = pytest.mark.vllm
DEFAULT = Path(__file__).resolve().parents[2] / "config" / "default.yaml"


@pytest.fixture(scope="module")
def shipped_default(tmp_path_factory):
    vllm = yaml.safe_load(DEFAULT.read_text())["worker"]["vllm"]
    assert vllm["max_model_len"] >= 32_768  # what the README promises an agent
    with running_stack(tmp_path_factory.mktemp("long-context"), make_config("vllm", worker={"vllm": vllm})) as s:
        yield s


def test_a_prompt_past_the_models_own_window_is_answered(shipped_default):
    # ~9.8k tokens of a "repository" (numbered functions), as an agent's context would be.
    code = "".join(f"def helper_{i}(value):\n    return value * {i} + {i % 7}\n\n" for i in range(450))
    client = anthropic.Anthropic(base_url=f"http://{shipped_default.envoy}", api_key="unused", max_retries=0)
    t0 = time.monotonic()
    first_at = None
    with client.messages.stream(
        model="smollm2-135m-instruct",
        max_tokens=8,
        system="You are a coding assistant.",
        messages=[{"role": "user", "content": f"{code}\nWhich function multiplies by 7?"}],
        timeout=600,
    ) as stream:
        for text in stream.text_stream:
            if text and first_at is None:
                first_at = time.monotonic() - t0
        final = stream.get_final_message()
    assert final.usage.input_tokens > 8_192, final.usage  # past SmolLM2's trained window
    assert final.usage.output_tokens >= 1 and final.stop_reason in ("end_turn", "max_tokens")
    print("\nLONG PROMPT", json.dumps({"input_tokens": final.usage.input_tokens, "ttft_s": round(first_at or 0, 1)}))
