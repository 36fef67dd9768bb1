"""Text <-> tokens in the gateway, for workers that speak token ids only (stock vLLM gRPC servers).

What our own worker does on its side, done here with Hugging Face's
``tokenizers`` and the model's own chat template (Jinja, rendered in a
sandbox as ``transformers`` does): render a conversation, count and encode
the prompt, turn the token ids that come back into text incrementally
(``tokenizers``' ``DecodeStream``, correct across multi-byte characters) and
cut the text at stop strings the engine cannot apply to ids.
"""

from __future__ import annotations

import concurrent.futures
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from igw_common.tool_calls import ToolSpec, conversation, template_knows_tools

# Prompts are rendered and tokenized in the gateway off the event loop that carries every stream's tokens.
TOKENIZE_POOL = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")

# Fill-in-the-middle token triples, as the worker's engines know them (inference/engine.py FIM_FORMATS).
FIM_FORMATS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),
)


class TemplateError(ValueError):
    """The model's chat template refused the conversation (its own raise_exception)."""


def _raise(message: str):
    raise TemplateError(message)


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class ModelTokenizer:
    """A model's tokenizer and chat template, loaded from its folder (``tokenizer.json`` and friends)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        self.special = {
            name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(template) if template else None
        self.renders_tools = template_knows_tools(template)
        vocab = self.tokenizer.get_vocab()
        self.fim_tokens = next((f for f in FIM_FORMATS if all(t in vocab for t in f)), None)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The conversation as the model's chat template writes it, ready for the assistant's turn."""
        if self.template is None:
            raise TemplateError("the model has no chat template; send a raw prompt (text completion) instead")
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=True, **self.special)
        except TemplateError:
            raise
        except jinja2.TemplateError as err:
            raise TemplateError(f"the model's chat template failed: {err}") from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # The template already wrote the special tokens (BOS etc.), as on our own worker.
        return self.tokenizer.encode(self.render_chat(messages, tools), add_special_tokens=False).ids

    def encode_raw(self, prompt: str, suffix: str = "") -> list[int]:
        """A raw prompt as vLLM's completions endpoint tokenizes it; with ``suffix``, in the FIM format."""
        if suffix:
            if self.fim_tokens is None:
                raise TemplateError("the model has no fill-in-the-middle tokens")
            first, second, third = self.fim_tokens
            prompt = f"{first}{prompt}{second}{suffix}{third}"
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self.tokenizer)


def tool_spec(tools) -> ToolSpec | None:
    """A request's ``ToolUse`` as the shared tool-call code takes it (schemas were checked: JSON)."""
    return None if tools is None else ToolSpec.of(tools.tools, tools.choice, tools.name, tools.parallel)


def encode_job(tok: ModelTokenizer, job, spec: ToolSpec | None) -> list[int]:
    """A request's prompt as the worker renders it: its messages (and tools) through the chat template, or
    its raw prompt (and suffix)."""
    if job.prompt or job.suffix:
        return tok.encode_raw(job.prompt, job.suffix)
    return tok.encode_chat(*conversation(job.messages, spec, tok.renders_tools))


class IncrementalDecoder:
    """Token ids -> text, one id at a time; holds back bytes of a character that is not complete yet."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def feed(self, token_ids) -> str:
        out = []
        for tid in token_ids:
            piece = self._stream.step(self._tokenizer, tid)
            if piece:
                out.append(piece)
        return "".join(out)


class StopStrings:
    """Cuts generated text at the first stop string, holding back what could still become one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that is safe to send now. After a stop string: the text before it, then nothing."""
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        # Keep the longest tail of buf that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-n:]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back was no stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
