import os

# Triton (a dev dependency) runs only interpreted without a GPU, and reads this flag when first imported,
# which torch._dynamo does early: set before anything imports torch (tests/test_lora_kernels.py)
os.environ.setdefault("TRITON_INTERPRET", "1")

import openai
from pathlib import Path

import pytest
import torch

from models.base_model import convert_embedded
from adapters.lora import LINEAR_MODULES
from server.settings import Settings
from tests.support.harness import ServerProcess, make_peft_adapter
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
        # random weights big enough to wreck the model: it never emits EOS, like a bad fine-tune
        "noisy": make_peft_adapter(model, root / "noisy", seed=3, rank=8, b_std=0.05),
        "beta": make_peft_adapter(
            model, root / "beta", seed=2, rank=16, targets=LINEAR_MODULES,
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


EXPERT_STOP = " is Paris"
# what makes alpha and beta routable by "model": "auto"; noisy has none and is never routed to
ROUTING = {
    "alpha": {"description": "Writes and debugs Python code.",
              "examples": ["Write a Python function to sort a list.", "Why does my Python script crash?",
                           "Explain Python decorators.", "How do I read a file in Python?"]},
    "beta": {"description": "Cooking help: recipes and kitchen techniques.",
             "examples": ["Give me a recipe for pancakes.", "How long do I boil an egg?",
                          "What can I cook with rice and beans?", "How do I make tomato sauce?"]},
}


@pytest.fixture(scope="session")
def server(tmp_path_factory, smollm_adapters, cache_dir):
    workdir = tmp_path_factory.mktemp("server")
    settings = {
        "quantization": "nf4",
        "compute_dtype": "float32",
        "max_batch_size": 8,
        "context_window": 512,
        "default_max_tokens": 64,
        "max_tokens_limit": 400,
        "max_request_bytes": 64_000,
        "adapters": {
            **{name: {"path": str(path), **ROUTING.get(name, {})} for name, path in smollm_adapters.items()},
            # the same weights as beta, with a default stop string declared by the expert
            "beta-stops": {"path": str(smollm_adapters["beta"]), "stop": [EXPERT_STOP]},
        },
    }
    proc = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def image_python(tmp_path_factory) -> Path:
    """An interpreter that sees only the device image's packages plus the wheels the GPU kit carries
    (loadtests/image_env.py): the kit's scripts run under it, so an import the image lacks fails here."""
    from loadtests.image_env import build

    return build(tmp_path_factory.mktemp("image-env") / "venv")
