"""The decode step a CUDA graph records (server/engine/decode_graphs.py), run eagerly on this CPU over
the same fixed buffers (capture=False): same logits as the eager step, padding that leaves the zero
block zero, the steps that must stay eager. Capture itself needs CUDA: loadtests/gpu_smoke.py checks it."""
import pytest
import torch

from adapters.lora import BaseShape, load_lora
from tests.support.harness import RunnerDriver, make_peft_adapter
from server.engine import lora_kernels  # noqa: F401  (Triton interpreted: conftest sets TRITON_INTERPRET)
from server.engine.decode_graphs import DecodeGraphs, Dims, StaticDecode, plan_shapes, row_buckets, width_buckets
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
    assert graphs.failed == {} and graphs.trusted == set(graphs.shapes)
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


SEVEN_B = Dims(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, vocab=32000, block_size=16,
               element=2)


def _lora_size(rows):
    return rows + 3 * 8 + 1  # StaticSegments.size(rows, 8 slots)


def test_the_shapes_captured_at_start_fit_their_budget():
    """A 7B in bf16, batch 64, 2,048-token context: every row bucket x key width x LoRA is the issue's 176
    shapes and needs GiBs (64 rows over 2,048 keys gather 1 GiB of keys alone); a smaller budget keeps the
    shortest widths whole, in order, and nothing past its bytes."""
    full, full_bytes = plan_shapes(SEVEN_B, 64, 128, True, _lora_size, 1 << 40)
    assert len(full) == 11 * 8 * 2 and {key[1] for key in full} == {1, 2, 4, 8, 16, 32, 64, 128}
    assert full_bytes > 3 * 2**30
    for budget in (full_bytes // 4, full_bytes // 20, 2**20):
        part, part_bytes = plan_shapes(SEVEN_B, 64, 128, True, _lora_size, budget)
        widths = sorted({key[1] for key in part})
        assert part_bytes <= budget and widths == [1, 2, 4, 8, 16, 32, 64, 128][: len(widths)]
        assert len(part) == len(widths) * 11 * 2  # a width is captured whole: every row bucket, LoRA or not
    assert plan_shapes(SEVEN_B, 64, 128, True, _lora_size, 0) == ([], 0)
    base_only, _ = plan_shapes(SEVEN_B, 64, 128, False, _lora_size, 1 << 40)  # torch LoRA kernels: no LoRA graphs
    assert len(base_only) == 88 and not any(key[2] for key in base_only)
    assert width_buckets(32) == [1, 2, 4, 8, 16, 32] and width_buckets(12) == [1, 2, 4, 8, 12]


def test_the_kv_planner_takes_the_graphs_memory_out_first(monkeypatch):
    from transformers import LlamaConfig

    from server.settings import ConfigError, Settings
    from server.startup import kv_budget

    cuda = torch.device("cuda")  # only the free-memory probe touches the device: replaced here
    monkeypatch.setattr(kv_budget, "_free_memory", lambda device: 100 * 2**30)
    settings = Settings(max_batch_size=64, context_window=2048)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=32)
    adapters = 5 * 2**30
    graphs = kv_budget.graph_budget_bytes(settings, cuda, config, torch.bfloat16, 2048, True, 8, adapters)
    assert 3 * 2**30 < graphs <= (100 * 2**30 - adapters) * 0.08  # every shape fits 8% of 95 GiB
    assert kv_budget.graph_budget_bytes(settings, torch.device("cpu"), config, torch.bfloat16, 2048, True, 8, 0) == 0
    off = Settings(max_batch_size=64, context_window=2048, cuda_graphs="off")
    assert kv_budget.graph_budget_bytes(off, cuda, config, torch.bfloat16, 2048, True, 8, adapters) == 0
    block = 2**20
    without = kv_budget.plan_kv_blocks(settings, cuda, block, 2048, adapters)
    with_graphs = kv_budget.plan_kv_blocks(settings, cuda, block, 2048, adapters, graphs)
    assert without - with_graphs == pytest.approx(graphs * 0.9 / block, abs=1)
    fixed = Settings(max_batch_size=64, context_window=2048, kv_cache_memory="92GiB")
    with pytest.raises(ConfigError, match=r"the CUDA graphs \(\d+\.\d+ GiB\).*or set cuda_graphs: off"):
        kv_budget.plan_kv_blocks(fixed, cuda, block, 2048, adapters, graphs)


def test_a_replay_unlike_the_eager_step_disables_that_shape_alone(tiny, tokenizer, monkeypatch, caplog):
    """The first replay of each shape is checked against the same padded step run eagerly; a mismatch
    (injected here for the 2-row shape) disables that shape with a warning and a count, the step is answered
    eagerly (the eager runner's logits), and the other shapes keep replaying. Shapes not planned (the
    budget) run eagerly."""
    drivers = {name: RunnerDriver(ModelRunner(tiny, tokenizer, 65, 16, 128)) for name in ("eager", "static")}
    graphs = drivers["static"].runner.graphs = DecodeGraphs(drivers["static"].runner, 8, capture=False)
    real = StaticDecode.replay
    monkeypatch.setattr(StaticDecode, "replay", lambda self: real(self) + (100.0 if self.rows == 2 else 0.0))
    for driver in drivers.values():
        driver.prefill({0: (PROMPTS[0], None), 1: (PROMPTS[1], None), 2: (PROMPTS[3], None)})
    tokens = {0: 5, 1: 6, 2: 7}
    with caplog.at_level("WARNING", logger="server.engine.decode_graphs"):
        for step in range(6):
            if step == 2:  # 3 rows (bucket 4) -> 2 rows (bucket 2)
                for driver in drivers.values():
                    driver.release(2)
                tokens.pop(2)
            if step == 4:  # back to 3 rows: the 4-row shape replays again
                for driver in drivers.values():
                    driver.prefill({2: (PROMPTS[3], None)})
                tokens[2] = 7
            logits = {name: driver.decode(tokens) for name, driver in drivers.items()}
            torch.testing.assert_close(logits["static"], logits["eager"], rtol=1e-4, atol=1e-4)
            tokens = {key: int(t) for key, t in zip(tokens, logits["eager"].argmax(-1))}
    assert set(graphs.failed) == {(2, 1, False)} and "differs from the eager step by" in graphs.failed[(2, 1, False)]
    assert graphs.trusted == {(4, 1, False)} and graphs.stats()["disabled"] == 1
    assert "CUDA graph of 2 rows, 1 key blocks, LoRA False disabled" in caplog.text
    replays = graphs.replays
    drivers["static"].decode(tokens)
    assert graphs.replays == replays + 1  # the 4-row shape: still replayed
    graphs.planned = {(2, 1, False)}  # what a budget that kept only that shape leaves: 3 rows run eagerly
    drivers["static"].decode(tokens)
    assert graphs.replays == replays + 1
