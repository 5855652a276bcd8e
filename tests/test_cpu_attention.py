"""The CPU decode-attention kernel (server/engine/cpu_attention.py): right answers, batch invariance, and the
runner's two attention paths agreeing on the tiny model."""
from __future__ import annotations

import pytest
import torch

from server.engine import cpu_attention


@pytest.fixture(scope="module")
def kernel():
    op, why = cpu_attention.load()
    if op is None:
        pytest.skip(f"the CPU attention kernel is not available here: {why}")
    return op


def _reference(q, k_cache, v_cache, tables, lengths, scale):
    """Plain float64 attention of each row over its own first `length` positions."""
    rows, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        length = int(lengths[r])
        slots = [int(tables[r, t // block_size]) * block_size + t % block_size for t in range(length)]
        keys = k_cache.reshape(-1, kv_heads, dim)[slots].double()  # [length, kv, dim]
        values = v_cache.reshape(-1, kv_heads, dim)[slots].double()
        for h in range(heads):
            scores = keys[:, h // group] @ q[r, h].double() * scale
            out[r, h] = torch.softmax(scores, 0) @ values[:, h // group]
    return out


def _case(seed, rows, heads, kv_heads, dim, dtype, block_size=16, blocks=64, max_length=300):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, dim, generator=generator)
    k_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.randint(1, max_length, (rows,), generator=generator)
    width = int(-(-lengths.max() // block_size))
    tables = torch.stack([torch.randperm(blocks - 1, generator=generator)[:width] + 1 for _ in range(rows)])
    return q, k_cache, v_cache, tables, lengths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (8, 1, 32), (16, 2, 256)])
def test_matches_plain_attention(kernel, dtype, heads, kv_heads, dim):
    q, k_cache, v_cache, tables, lengths = _case(0, 7, heads, kv_heads, dim, dtype)
    lengths[0], lengths[1], lengths[2] = 1, 16, 17  # one key; exactly a block; one past a block
    out = kernel(q, k_cache, v_cache, tables, lengths, dim**-0.5)
    expected = _reference(q, k_cache, v_cache, tables, lengths, dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_a_row_gets_the_same_bits_whatever_shares_the_call(kernel):
    q, k_cache, v_cache, tables, lengths = _case(1, 16, 9, 3, 64, torch.bfloat16)
    together = kernel(q, k_cache, v_cache, tables, lengths, 0.125)
    for row in (0, 5, 15):
        alone = kernel(q[row : row + 1].clone(), k_cache, v_cache, tables[row : row + 1].clone(),
                       lengths[row : row + 1].clone(), 0.125)
        assert torch.equal(alone[0], together[row])
    # a table wider than the row needs (the step's widest row sets the width) changes nothing
    wider = torch.cat((tables, tables.new_zeros(16, 4)), dim=1)
    assert torch.equal(kernel(q, k_cache, v_cache, wider, lengths, 0.125), together)


def test_nan_in_a_row_stays_in_that_row(kernel):
    q, k_cache, v_cache, tables, lengths = _case(2, 4, 9, 3, 64, torch.bfloat16)
    q[1, 0, 0] = float("nan")
    out = kernel(q, k_cache, v_cache, tables, lengths, 0.125)
    assert out[1, 0].isnan().all()
    assert not out[[0, 2, 3]].isnan().any()


def test_bad_shapes_are_refused(kernel):
    q, k_cache, v_cache, tables, lengths = _case(3, 2, 9, 3, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernel(q[..., :40].contiguous(), k_cache[..., :40].contiguous(), v_cache[..., :40].contiguous(), tables,
               lengths, 0.125)
    with pytest.raises(RuntimeError, match="tables"):
        kernel(q, k_cache, v_cache, tables.int(), lengths, 0.125)


def test_unsupported_shapes_keep_the_torch_path():
    assert cpu_attention.resolve("auto", torch.device("cpu"), head_dim=40, group=1) is None
    assert cpu_attention.resolve("auto", torch.device("cpu"), head_dim=64, group=16) is None
    assert cpu_attention.resolve("torch", torch.device("cpu"), head_dim=64, group=3) is None
    with pytest.raises(ValueError, match="not available"):
        cpu_attention.resolve("kernel", torch.device("cpu"), head_dim=40, group=1)
    with pytest.raises(ValueError, match="auto, kernel or torch"):
        cpu_attention.resolve("fast", torch.device("cpu"), head_dim=64, group=3)


def test_the_runner_paths_agree(kernel, tiny_folder, tokenizer):
    """The tiny model's decode logits through the kernel and through the gather-and-matmul path: the same up to
    float32 rounding (different summation orders), for rows at different lengths in one step."""
    from transformers import AutoModelForCausalLM

    from server.engine.model_runner import ModelRunner, StepItem

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    logits = {}
    for attention in ("kernel", "torch"):
        runner = ModelRunner(model, tokenizer, 64, 16, 512, attention=attention)
        assert (runner.attention_kernel is not None) == (attention == "kernel")
        tables = [[1 + 8 * i + j for j in range(8)] for i in range(3)]
        runner.clear_blocks([block for table in tables for block in table])  # as the engine hands blocks out
        prompts = [list(range(3, 3 + n)) for n in (5, 40, 100)]
        runner.step([StepItem(p, 0, t, None) for p, t in zip(prompts, tables)])
        logits[attention] = runner.step([StepItem([7], len(p), t, None) for p, t in zip(prompts, tables)])
    torch.testing.assert_close(logits["kernel"], logits["torch"], atol=1e-4, rtol=1e-4)


def test_asking_for_the_kernel_where_it_cannot_run_is_a_config_error(tiny_folder, monkeypatch):
    """`attention: kernel` on a machine where the kernel cannot run stops start-up with the reason, as a config
    error (not a traceback); `auto` there serves on the torch path."""
    from server.settings import ConfigError, Settings
    from server.startup.bootstrap import build_runner

    cpu_attention.load.cache_clear()
    monkeypatch.setattr(cpu_attention.native, "avx512", lambda: "this CPU's capability is DEFAULT")
    try:
        settings = dict(base_model=str(tiny_folder), quantization="none", device="cpu", kv_cache_tokens=1024)
        with pytest.raises(ConfigError, match="attention: kernel is not available here: this CPU's capability"):
            build_runner(Settings(**settings, attention="kernel"))
        runner, _ = build_runner(Settings(**settings, attention="auto"))
        assert runner.attention_kernel is None
    finally:
        cpu_attention.load.cache_clear()  # the real answer for the tests after this one
