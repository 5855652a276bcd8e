"""Test-only helpers (the server and adapter harness shared with load tests is loadtests/harness.py)."""
from __future__ import annotations

import httpx

BASE = "SmolLM2-135M-Instruct"  # the embedded default's served name


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    # bitsandbytes on CPU wants widths divisible by its block size: keep dims multiples of 64.
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )


def ask(client, model, question, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)


def post(server, body, headers=None, **kwargs):
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120, **kwargs)


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error
