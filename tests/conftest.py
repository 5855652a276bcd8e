import os
from pathlib import Path

import pytest
import torch

from server.model_loader import convert_embedded
from server.settings import Settings
from loadtests.harness import make_peft_adapter
from tests.support import tiny_llama_config


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return Settings().cache_dir  # LORAPLEX_CACHE or ~/.cache/loraplex, as the server uses


@pytest.fixture(scope="session")
def smollm_folder(cache_dir) -> Path:
    """The embedded SmolLM2, converted to safetensors (once per machine)."""
    return convert_embedded(cache_dir)


@pytest.fixture(scope="session")
def tokenizer(smollm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


@pytest.fixture(scope="session")
def smollm_adapters(smollm_folder, tmp_path_factory) -> dict[str, Path]:
    """Two small non-zero LoRA adapters for the real model, made with peft."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_folder, dtype=torch.float32)
    root = tmp_path_factory.mktemp("smollm-adapters")
    return {
        # b_std 0.005 shifts answers while keeping them coherent; much more and they turn to noise
        "alpha": make_peft_adapter(model, root / "alpha", seed=1, rank=8, b_std=0.005),
        "beta": make_peft_adapter(
            model, root / "beta", seed=2, rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            b_std=0.005,
        ),
    }


@pytest.fixture(scope="session")
def tiny_folder(tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a HF folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
