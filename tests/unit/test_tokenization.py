"""Tokenizing in the gateway (for stock vLLM gRPC workers) matches what vLLM's side does.

Uses the embedded model's folder (``make model`` prepares it; ``make test`` and ``make test-fast`` run it).
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gateway.workers.tokenization import ModelTokenizer, StopStrings, TemplateError
from inference import embedded_model

CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "héllo 漢字 🙂"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "def f(x):\n    return x"},
    ],
]


@pytest.fixture(scope="module")
def folder():
    return str(embedded_model.prepare())


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_matches_transformers(folder, messages):
    ours = ModelTokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages) == text
    assert ours.encode_chat(messages) == hf.encode(text, add_special_tokens=False)
    assert ours.encode_raw("def f(") == hf.encode("def f(")


def test_incremental_decoding_holds_partial_characters(folder):
    tok = ModelTokenizer(folder)
    text = "naïve 漢字 and 🙂 emoji, then code: print('x')"
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    dec = tok.decoder()
    pieces = [dec.feed([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_no_fill_in_the_middle_tokens_in_smollm2(folder):
    tok = ModelTokenizer(folder)
    assert tok.fim_tokens is None
    with pytest.raises(TemplateError):
        tok.encode_raw("def f(", "):")


def test_stop_strings_cut_across_deltas():
    s = StopStrings(["\n\n", "END"])
    out = [s.feed(x) for x in ("def f():", "\n", "    return 1", "\n", "\nmore")]
    assert "".join(out) == "def f():\n    return 1" and s.stopped
    s = StopStrings(["END"])
    assert s.feed("the EN") == "the "  # "EN" could start END: held back
    assert s.feed("D is near") == "" and s.stopped
    s = StopStrings(["END"])
    assert s.feed("EN") == "" and s.feed("ough") == "ENough" and s.flush() == ""
    s = StopStrings(["abc"])
    assert s.feed("xa") == "x" and s.flush() == "a"  # the end: what was held was no stop string
