"""The int4 CPU base (models/cpu_int4.py): GGUF blocks taken without a second rounding, the fused linears, the
Q8_0 (or bf16) embedding / lm_head and bf16 KV, and batch invariance on a CPU."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from models import cpu_int4
from models.base_model import _gguf_linears, embedded_gguf_path, load_int4
from tests.support.harness import RunnerDriver, make_peft_adapter

pytestmark = pytest.mark.skipif(cpu_int4.supported() is not None, reason="no int4 CPU kernel in this torch")


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0"])
def test_gguf_blocks_are_taken_as_stored(kind):
    """q, scale and zero read from GGUF blocks stand for exactly what gguf itself dequantizes."""
    import gguf

    kind_enum = gguf.GGMLQuantizationType[kind]
    weight = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    raw = gguf.quants.quantize(weight, kind_enum)
    q, scale, zero = cpu_int4.from_gguf_blocks(kind, raw, weight.shape)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, kind_enum).reshape(weight.shape))
    assert torch.equal(cpu_int4.dequantize(q, scale, zero), expected)


def test_int4_linear_computes_its_groups_and_is_batch_invariant():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    groups = cpu_int4.quantize(weight)
    dequantized = cpu_int4.dequantize(*groups)
    assert (dequantized - weight).abs().max() <= (weight.max() - weight.min()) / 15  # within a step of 16 levels
    linear = cpu_int4.Int4Linear(*groups)
    x = torch.randn(40, 128)
    out = linear(x)
    assert out.dtype == torch.float32 and out.shape == (40, 96)
    torch.testing.assert_close(out, x @ dequantized.T, rtol=2e-2, atol=2e-2)  # bf16 activations
    for rows in (1, 2, 3, 5, 16, 17):  # a row's bits do not depend on how many rows share the matmul
        assert torch.equal(linear(x[:rows]), out[:rows])


@pytest.mark.skipif(cpu_int4.kernel()[0] is None, reason="our int4 kernel does not run on this CPU")
def test_our_kernel_computes_the_groups_exactly_held():
    """Our kernel (int4_matmul.cpp) against float64 arithmetic on the very weights the groups stand for (GGUF
    Q4_1 blocks: scales and offsets exactly float16) and the rows' bf16 inputs: float32 rounding only. PyTorch's
    kernel, with its bf16 scales, is further off. Rows of every tile size, and columns of several blocks."""
    import gguf

    weight = np.random.default_rng(3).standard_normal((80, 256)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    groups = cpu_int4.from_gguf_blocks("Q4_1", raw, weight.shape)
    exact = cpu_int4.dequantize(*groups).double()
    x = torch.randn(19, 256).to(torch.bfloat16)
    expected = x.double() @ exact.T
    ours = cpu_int4.Int4Linear(*groups, ours=True)(x.float())
    theirs = cpu_int4.Int4Linear(*groups, ours=False)(x.float())
    ours_error = (ours.double() - expected).abs().max().item()
    assert ours_error < 1e-5, ours_error
    assert ours_error < (theirs.double() - expected).abs().max().item()
    linear = cpu_int4.Int4Linear(*groups, ours=True)
    for rows in (1, 7, 8, 9, 16, 17):  # tiles of eight rows and what is left
        assert torch.equal(linear(x[:rows].float()), ours[:rows])


@pytest.mark.skipif(cpu_int4.int8_kernel() is None, reason="our int8 kernel does not run on this CPU")
def test_q8_table_holds_gguf_blocks_exactly_and_its_logits_are_batch_invariant():
    """A GGUF Q8_0 table read as stored: its rows as the embedding are exactly what gguf dequantizes; its
    logits (int8_matmul in int4_matmul.cpp) against float64 arithmetic on those weights and the rows' bf16
    inputs: float32 rounding only, and a row's bits the same whatever the number of rows (tiles of eight).
    A table quantized here (quantize_int8) is within half a step of its weights."""
    import gguf

    weight = np.random.default_rng(4).standard_normal((96, 192)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(weight.shape))
    table = cpu_int4.Int8Table(*cpu_int4.from_gguf_q8(raw, weight.shape))
    ids = torch.tensor([[0, 17, 95], [16, 15, 64]])
    assert torch.equal(table(ids), exact[ids])
    x = torch.randn(19, 192).to(torch.bfloat16)
    expected = x.double() @ exact.double().T
    logits = cpu_int4.Int8Head(table)(x.float())
    assert logits.dtype == torch.float32 and logits.shape == (19, 96)
    assert (logits.double() - expected).abs().max().item() < 1e-5
    for rows in (1, 7, 8, 9, 16, 17):
        assert torch.equal(table.logits(x[:rows].float()), logits[:rows])
    q, scale = cpu_int4.quantize_int8(torch.from_numpy(weight))
    held = cpu_int4.Int8Table(q, scale)(torch.arange(96))
    step = torch.from_numpy(weight).reshape(96, 6, 32).abs().amax(-1) / 127
    assert ((held - torch.from_numpy(weight)).reshape(96, 6, 32).abs() <= step[..., None] * 0.51).all()
    with pytest.raises(ValueError, match="multiple"):
        cpu_int4.Int8Table(q[:90], scale[:90])


def test_embedded_gguf_embedding_is_its_q8_blocks(smollm_folder):
    """The default model's embedding / tied lm_head is the GGUF's own token_embd Q8_0 blocks (what llama.cpp
    computes its logits with), exactly; where our kernel does not run it stays the folder's bf16 weights."""
    import gguf

    from models.base_model import _int8_tables

    tables = _int8_tables(embedded_gguf_path(), None, tied=True)
    if cpu_int4.int8_kernel() is None:
        assert tables is None
        return
    embedding, head = tables
    assert head is embedding
    stored = next(t for t in gguf.GGUFReader(embedded_gguf_path()).tensors if t.name == "token_embd.weight")
    rows = torch.tensor([0, 1, 2, 100, 49151])
    expected = gguf.quants.dequantize(stored.data[rows.numpy()], stored.tensor_type)
    assert torch.equal(embedding(rows), torch.from_numpy(expected.reshape(len(rows), -1)))


@pytest.mark.skipif(cpu_int4.int8_kernel() is None, reason="our int8 kernel does not run on this CPU")
def test_tables_from_a_folder_are_quantized_once_and_an_odd_vocabulary_stays_bf16():
    """Without a GGUF the folder's embedding is quantized to Q8_0 (an untied lm_head gets its own table); a
    vocabulary the kernel's blocks of 16 rows do not divide keeps the bf16 path (None) instead of failing."""
    from models.base_model import _int8_tables

    torch.manual_seed(5)
    weights = {"model.embed_tokens.weight": torch.randn(64, 96), "lm_head.weight": torch.randn(64, 96)}
    embedding, head = _int8_tables(None, weights.__getitem__, tied=False)
    assert head is not embedding and head.num_embeddings == 64
    torch.testing.assert_close(embedding(torch.arange(64)), weights["model.embed_tokens.weight"], atol=0.02, rtol=0)
    odd = {"model.embed_tokens.weight": torch.randn(100, 96)}
    assert _int8_tables(None, odd.__getitem__, tied=True) is None


def test_pytorch_kernel_stays_usable():
    """Where our kernel does not run (no AVX-512 BF16), PyTorch's computes the same linear."""
    torch.manual_seed(2)
    groups = cpu_int4.quantize(torch.randn(48, 64) * 0.05)
    x = torch.randn(5, 64)
    theirs = cpu_int4.Int4Linear(*groups, ours=False)
    assert theirs.scales_zeros is not None
    torch.testing.assert_close(theirs(x), x @ cpu_int4.dequantize(*groups).T, rtol=2e-2, atol=2e-2)


def test_fused_linear_is_its_parts_side_by_side():
    torch.manual_seed(1)
    parts = [cpu_int4.quantize(torch.randn(n, 64)) for n in (64, 32, 32)]
    x = torch.randn(3, 64)
    fused = cpu_int4.fuse(parts)(x)
    assert torch.equal(fused, torch.cat([cpu_int4.Int4Linear(*p)(x) for p in parts], dim=-1))


def test_embedded_gguf_loads_exactly_the_weights_transformers_dequantizes(smollm_folder):
    """The default model's linears, read from its own GGUF blocks (q and k rows put back in Hugging Face's
    order), are exactly the converted folder's weights: no second rounding."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm_folder)
    config.num_hidden_layers = 2  # the first two layers are enough
    groups = _gguf_linears(embedded_gguf_path(), config)
    with safe_open(smollm_folder / "model.safetensors", framework="pt") as handle:
        for (layer, module), parts in groups.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            expected = handle.get_tensor(f"model.layers.{layer}.{part}.{module}.weight")
            assert torch.equal(cpu_int4.dequantize(*parts), expected), (layer, module)


@pytest.fixture(scope="module")
def tiny_int4(tiny_folder):
    return load_int4(tiny_folder, torch.float32).eval()


def test_int4_model_follows_the_full_precision_one(tiny_int4, tiny_folder, tokenizer):
    """The fused int4 runner's logits against the fp32 model's: close (4-bit weights, bf16 activations), the
    lm_head tied to the embedding (a Q8_0 table where our kernel runs, else bf16), the KV cache in bf16 where
    the CPU has it."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    driver = RunnerDriver.build(tiny_int4, tokenizer)
    assert driver.runner.fused
    if cpu_int4.int8_kernel() is not None:  # the tied table in Q8_0 blocks, one table for both
        assert isinstance(tiny_int4.lm_head, cpu_int4.Int8Head) and tiny_int4.lm_head.table is tiny_int4.model.embed_tokens
    else:
        assert tiny_int4.lm_head.weight is tiny_int4.model.embed_tokens.weight
    prompt = [1, 504, 3575, 282, 4649, 9690, 198]
    ours = driver.prefill({0: (prompt, None)})[0]
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0, -1]
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=0)
    assert cosine > 0.98, cosine


def test_int4_decode_rows_are_batch_invariant_with_adapters(tiny_int4, tiny_folder, tokenizer, tmp_path):
    """A request's logits are bit-identical alone and in a batch with other requests and other adapters."""
    from adapters.lora import BaseShape, load_lora

    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    shape = BaseShape.from_config(reference.config)
    adapter = load_lora(make_peft_adapter(reference, tmp_path / "a", seed=1, rank=8,
                                          targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")), shape)
    driver = RunnerDriver.build(tiny_int4, tokenizer)
    driver.runner.lora.add("a", adapter)
    prompts = {0: ([1, 504, 3575, 282], "a"), 1: ([1, 22, 33, 44, 55, 66, 77, 88, 99], None),
               2: ([1, 9690, 198], "a")}
    alone = {key: driver.prefill({key: request})[0] for key, request in prompts.items()}
    together = driver.prefill(prompts)
    for index, key in enumerate(prompts):
        assert torch.equal(together[index], alone[key]), key
    steps_alone = {key: driver.decode({key: 7})[0] for key in prompts}
    for key, request in prompts.items():  # again from the same state, then decoded together
        driver.prefill({key: request})
    steps_together = driver.decode({key: 7 for key in prompts})
    for index, key in enumerate(prompts):
        assert torch.equal(steps_together[index], steps_alone[key]), key
