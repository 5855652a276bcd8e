"""The decode step a CUDA graph records (server/engine/decode_graphs.py), run eagerly on this CPU over
the same fixed buffers (capture=False): same logits as the eager step, padding that leaves the zero
block zero, the steps that must stay eager. Capture itself needs CUDA: loadtests/gpu_smoke.py checks it."""
import pytest
import torch

from adapters.lora import BaseShape, load_lora
from loadtests.harness import RunnerDriver, make_peft_adapter
from server.engine import lora_kernels  # noqa: F401  (Triton interpreted: conftest sets TRITON_INTERPRET)
from server.engine.decode_graphs import DecodeGraphs, row_buckets
from server.engine.model_runner import ModelRunner

PROMPTS = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683], [1, 22, 33, 44, 55, 66, 77] * 3, [1, 5, 6]]


def test_row_buckets():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(16) == [1, 2, 4, 8, 16]
    assert row_buckets(100)[-3:] == [56, 64, 100]
    assert row_buckets(1) == [1]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def test_static_decode_steps_give_the_eager_logits(tiny, tokenizer, tmp_path):
    """Rows on two adapters (Triton kernels) and on the base, 3 rows padded to a bucket of 4, rows of
    different lengths over one key width; then a row leaves, a mixture joins (eager), a prompt chunk
    (eager). The eager runner and the static one keep identical caches, so every step compares."""
    shape = BaseShape.from_config(tiny.config)
    adapters = {"a": load_lora(make_peft_adapter(tiny, tmp_path / "a", seed=1, rank=8, b_std=0.2), shape),
                "b": load_lora(make_peft_adapter(tiny, tmp_path / "b", seed=2, rank=16, b_std=0.2,
                                                 targets=("q_proj", "v_proj", "down_proj")), shape)}
    drivers = {}
    for name in ("eager", "static"):
        runner = ModelRunner(tiny, tokenizer, 65, 16, 128, lora_kernels="triton")
        for adapter, weights in adapters.items():
            runner.lora.add(adapter, weights)
        drivers[name] = RunnerDriver(runner)
    graphs = drivers["static"].runner.graphs = DecodeGraphs(drivers["static"].runner, 8, capture=False)
    batch = {0: (PROMPTS[0], "a"), 1: (PROMPTS[1], None), 2: (PROMPTS[2], "b")}
    logits = {name: driver.prefill(batch) for name, driver in drivers.items()}  # prefill: eager in both
    assert graphs.shapes == {}
    tokens = {key: int(t) for key, t in zip(batch, logits["eager"].argmax(-1))}
    for step in range(20):  # row 2 crosses from 2 to 3 blocks: the key width bucket goes 2 -> 4
        if step == 12:
            for driver in drivers.values():
                driver.release(1)
            tokens.pop(1)
        if step == 14:  # a mixture: this step runs eagerly, the graphs stay trusted
            for driver in drivers.values():
                driver.prefill({3: (PROMPTS[3], (("a", 0.5), ("b", 0.5)))})
            tokens[3] = 7
        logits = {name: driver.decode(tokens) for name, driver in drivers.items()}
        torch.testing.assert_close(logits["static"], logits["eager"], rtol=1e-4, atol=1e-4)
        tokens = {key: int(t) for key, t in zip(tokens, logits["eager"].argmax(-1))}
    assert set(graphs.shapes) == {(4, 2, True), (4, 4, True), (2, 4, True)}  # (rows, key blocks, LoRA)
    assert graphs.disabled is None
    assert torch.count_nonzero(drivers["static"].runner.k_cache[:, 0]) == 0  # padding rows wrote zeros


def test_base_only_steps_use_a_shape_without_lora_and_torch_kernels_stay_eager(tiny, tokenizer, tmp_path):
    weights = load_lora(make_peft_adapter(tiny, tmp_path / "a", seed=1, b_std=0.2), BaseShape.from_config(tiny.config))
    runner = ModelRunner(tiny, tokenizer, 65, 16, 128)  # torch LoRA kernels
    driver = RunnerDriver(runner)
    reference = RunnerDriver(ModelRunner(tiny, tokenizer, 65, 16, 128))
    for d in (driver, reference):
        d.runner.lora.add("a", weights)
    graphs = runner.graphs = DecodeGraphs(runner, 4, capture=False)
    for d in (driver, reference):
        d.prefill({0: (PROMPTS[0], None), 1: (PROMPTS[1], None)})
    torch.testing.assert_close(driver.decode({0: 5, 1: 6}), reference.decode({0: 5, 1: 6}), rtol=1e-4, atol=1e-4)
    assert set(graphs.shapes) == {(2, 1, False)}
    for d in (driver, reference):
        d.prefill({2: (PROMPTS[3], "a")})
    assert graphs.shape_for([]) is None
    tokens = {0: 7, 1: 8, 2: 9}
    torch.testing.assert_close(driver.decode(tokens), reference.decode(tokens), rtol=1e-4, atol=1e-4)
    assert set(graphs.shapes) == {(2, 1, False)}  # LoRA on the torch kernels: eager


def test_cuda_graphs_setting_is_off_on_cpu(tiny, tokenizer):
    assert ModelRunner(tiny, tokenizer, 9, 16, 128, cuda_graphs="auto").graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        ModelRunner(tiny, tokenizer, 9, 16, 128, cuda_graphs="on")
