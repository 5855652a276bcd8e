"""Merge an expert into its base: a standalone Hugging Face model folder anyone can load.

The base is loaded as the server serves it on a GPU (NF4; a CPU serves int4 groups by default, other
roundings of the same weights), each 4-bit linear is dequantized to the float32 weight the server
computes with, the LoRA delta (B @ A, scaled) is added, and the result is saved unquantized: plain
`transformers` loads it with no peft or bitsandbytes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.base_model import EMBEDDED_BASE, load_model, resolve_base_folder
from adapters.lora import BaseShape, load_lora


def _dequantized(linear) -> torch.Tensor:
    weight = linear.weight
    if getattr(weight, "quant_state", None) is None:  # not quantized (quantization: none)
        return weight.data.float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()


def merge(adapter_dir: str | Path, out_dir: str | Path, base_model: str = EMBEDDED_BASE,
          quantization: str = "nf4", cache_dir: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = resolve_base_folder(base_model, cache_dir)
    quantized = load_model(folder, quantization, torch.float32)
    lora = load_lora(adapter_dir, BaseShape.from_config(quantized.config))  # same checks as serving
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # the float32 skeleton
    with torch.no_grad():
        for index, (source, target) in enumerate(zip(quantized.model.layers, merged.model.layers)):
            for block in ("self_attn", "mlp"):
                for name, linear in getattr(target, block).named_children():
                    if not isinstance(linear, torch.nn.Linear):
                        continue
                    weight = _dequantized(getattr(getattr(source, block), name))
                    pair = lora.pairs.get((index, name))
                    if pair is not None:
                        a, b = pair  # [in, r], [r, out], scaling folded into b
                        weight += (a @ b).T
                    linear.weight.copy_(weight)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out
