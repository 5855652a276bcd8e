"""The runner's own forward pass against Hugging Face's, and the batched LoRA against PEFT."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters.lora import BaseShape, load_lora
from tests.support.harness import RunnerDriver, make_peft_adapter

PROMPTS = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683], [1, 22, 33, 44, 55, 66, 77]]


def _greedy(driver: RunnerDriver, prompt: list[int], steps: int, adapter=None) -> list[int]:
    logits = driver.prefill({0: (prompt, adapter)})
    tokens = [int(logits[0].argmax())]
    for _ in range(steps - 1):
        logits = driver.decode({0: tokens[-1]})
        tokens.append(int(logits[0].argmax()))
    return tokens


def _hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_fp32(tiny_folder, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    return model


@pytest.mark.parametrize("quantized, dtype", [(False, torch.float32), (True, torch.float32),
                                              (True, torch.bfloat16)])  # bf16: the GPU's compute dtype
def test_greedy_matches_hf_generate(tiny_folder, tokenizer, quantized, dtype):
    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=dtype, **kwargs).eval()
    driver = RunnerDriver.build(model, tokenizer)
    for prompt in PROMPTS:
        assert _greedy(driver, prompt, 12) == _hf_greedy(model, prompt, 12)


def test_mixed_adapter_prefill_matches_peft(tiny_fp32, tokenizer, tiny_folder, tmp_path):
    from peft import PeftModel

    adapter_dirs = {
        "a": make_peft_adapter(tiny_fp32, tmp_path / "a", seed=1, rank=4, b_std=0.2),
        "b": make_peft_adapter(tiny_fp32, tmp_path / "b", seed=2, rank=8, b_std=0.2,
                               targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj")),
    }
    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    shape = BaseShape.from_config(tiny_fp32.config)
    for name, folder in adapter_dirs.items():
        driver.runner.lora.add(name, load_lora(folder, shape))
    ours = driver.prefill({0: (PROMPTS[0], "a"), 1: (PROMPTS[1], None), 2: (PROMPTS[2], "b")})

    fresh = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(fresh, adapter_dirs["a"], adapter_name="a")
    peft_model.load_adapter(adapter_dirs["b"], adapter_name="b")
    with torch.no_grad():
        expected = []
        for prompt, adapter in zip(PROMPTS, ["a", None, "b"]):
            if adapter is None:
                with peft_model.disable_adapter():
                    logits = peft_model(torch.tensor([prompt])).logits
            else:
                peft_model.set_adapter(adapter)
                logits = peft_model(torch.tensor([prompt])).logits
            expected.append(logits[0, -1])
    for row, want in enumerate(expected):
        torch.testing.assert_close(ours[row], want, rtol=1e-4, atol=1e-4)
    # and the adapters really change the answer
    assert not torch.allclose(ours[0], driver.prefill({0: (PROMPTS[0], None)})[0], atol=1e-3)


def test_mixed_batch_decode_equals_each_alone(tiny_fp32, tokenizer, tmp_path):
    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    shape = BaseShape.from_config(tiny_fp32.config)
    driver.runner.lora.add("a", load_lora(make_peft_adapter(tiny_fp32, tmp_path / "a", seed=3, b_std=0.2), shape))
    adapters = ["a", None, "a"]
    alone = [_greedy(driver, prompt, 10, adapter) for prompt, adapter in zip(PROMPTS, adapters)]

    logits = driver.prefill({i: (p, a) for i, (p, a) in enumerate(zip(PROMPTS, adapters))})
    together = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(9):
        logits = driver.decode({i: t[-1] for i, t in enumerate(together)})
        for row, token in enumerate(logits.argmax(-1).tolist()):
            together[row].append(token)
    assert together == alone


def test_batch_invariant_false_computes_a_lone_row_unpadded_with_the_same_answer(tiny_fp32, tokenizer, tmp_path):
    from server.engine.model_runner import ModelRunner

    invariant = RunnerDriver.build(tiny_fp32, tokenizer)
    fast = RunnerDriver(ModelRunner(tiny_fp32, tokenizer, 65, 16, 128, batch_invariant=False))
    assert (invariant.runner.lora.min_rows, fast.runner.lora.min_rows) == (4, 1)
    adapter = load_lora(make_peft_adapter(tiny_fp32, tmp_path / "a", seed=3, b_std=0.2),
                        BaseShape.from_config(tiny_fp32.config))
    for driver in (invariant, fast):
        driver.runner.lora.add("a", adapter)
    assert torch.allclose(fast.prefill({0: (PROMPTS[0], "a")}), invariant.prefill({0: (PROMPTS[0], "a")}), atol=1e-4)
    assert _greedy(fast, PROMPTS[1], 8, "a") == _greedy(invariant, PROMPTS[1], 8, "a")


def test_rank_and_alpha_patterns_match_peft(tiny_fp32, tokenizer, tiny_folder, tmp_path):
    """Per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern) give PEFT's own output."""
    from peft import PeftModel

    folder = make_peft_adapter(tiny_fp32, tmp_path / "p", seed=5, rank=8, b_std=0.2,
                               rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 16},
                               alpha_pattern={"down_proj": 64, "layers.0.self_attn.q_proj": 3})
    weights = load_lora(folder, BaseShape.from_config(tiny_fp32.config))
    assert weights.rank == 16  # the widest module; the others are zero-padded to it
    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    driver.runner.lora.add("p", weights)
    ours = driver.prefill({0: (PROMPTS[0], "p")})[0]
    fresh = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(fresh, folder)(torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    plain = driver.prefill({0: (PROMPTS[0], None)})[0]
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter really changes the answer


def test_a_mixture_row_is_the_weighted_sum_of_its_adapters_as_peft_cat_merges_them(tiny_fp32, tokenizer, tiny_folder,
                                                                                    tmp_path):
    """A row mixing a (0.7) and b (0.3) gives PEFT's add_weighted_adapter(combination_type="cat"), which is
    exactly Σ wᵢ·Bᵢ(Aᵢx); in a batch where the mixture sits beside single-adapter and base rows, grouped
    or interleaved; and a one-adapter mixture is that adapter bit for bit."""
    from peft import PeftModel

    folders = {"a": make_peft_adapter(tiny_fp32, tmp_path / "a", seed=11, rank=4, b_std=0.2),
               "b": make_peft_adapter(tiny_fp32, tmp_path / "b", seed=12, rank=8, b_std=0.2,
                                      targets=("q_proj", "v_proj", "down_proj"))}
    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    shape = BaseShape.from_config(tiny_fp32.config)
    for name, folder in folders.items():
        driver.runner.lora.add(name, load_lora(folder, shape))
    mix = (("a", 0.7), ("b", 0.3))
    batch = {0: (PROMPTS[0], mix), 1: (PROMPTS[1], "a"), 2: (PROMPTS[2], None), 3: (PROMPTS[0], (("a", 1.0),))}
    interleaved = driver.prefill(batch)
    alone = driver.prefill({0: (PROMPTS[0], mix)})[0]

    fresh = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(fresh, folders["a"], adapter_name="a")
    peft_model.load_adapter(folders["b"], adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    with torch.no_grad():
        expected = peft_model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(interleaved[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)  # alone or among others
    single = driver.prefill({**batch, 3: (PROMPTS[0], "a")})[3]
    assert torch.equal(interleaved[3], single)  # a one-adapter mixture is that adapter, bit for bit
    assert not torch.allclose(alone, single, atol=1e-3)


def test_adapter_memory_is_fixed_whatever_the_combinations(tiny_fp32, tokenizer, tmp_path):
    """The slot pool is allocated once; the step stack is updated in place as adapters join and leave
    the batch (its buffer never changes while the rank does not); a full pool refuses a new adapter
    and a freed slot is reused. Results do not depend on where an adapter sits in the stack (to float
    rounding: CPU BLAS rounds a prompt's rows differently with the segment count)."""
    import itertools

    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    bank = driver.runner.lora
    shape = BaseShape.from_config(tiny_fp32.config)
    names = [f"e{i}" for i in range(bank.slots)]
    weights = {name: load_lora(make_peft_adapter(tiny_fp32, tmp_path / name, seed=20 + i, rank=8, b_std=0.2), shape)
               for i, name in enumerate(names)}
    for name in names:
        bank.add(name, weights[name])
    with pytest.raises(RuntimeError, match="slots"):
        bank.add("one-too-many", weights["e0"])
    pool = bank.pool.data_ptr()
    reference = {name: driver.prefill({0: (PROMPTS[0], name)})[0] for name in names[:4]}
    stack = bank._stack.flat.data_ptr()
    for combo in itertools.chain(itertools.combinations(names[:4], 2), itertools.combinations(names[:4], 3),
                                 [tuple(reversed(names[:4]))]):
        logits = driver.prefill({i: (PROMPTS[0], name) for i, name in enumerate(combo)})
        for row, name in enumerate(combo):
            torch.testing.assert_close(logits[row], reference[name], rtol=1e-5, atol=1e-5)
    assert bank.pool.data_ptr() == pool and bank._stack.flat.data_ptr() == stack
    bank.remove("e7")
    bank.add("late", weights["e1"])  # into the freed slot
    assert torch.equal(driver.prefill({0: (PROMPTS[0], "late")})[0], reference["e1"])


def test_the_wide_and_segmented_lora_paths_give_a_row_the_same_bits(tiny_fp32, tokenizer, tmp_path, monkeypatch):
    """Which LoRA path a step takes depends on who shares it (lora_batch.WIDE_EXTRA_ROWS), so a row's
    result must not: three adapters of three ranks and the base, rows interleaved, every row bit for bit the
    same whether the step runs every row against every adapter (wide) or gathers rows into segments. A
    step with a mixture row is segmented, so the row's adapters' deltas are summed alike whoever shares it
    (on the wide path they would be summed inside a GEMM whose shape changes with the company)."""
    from server.engine import lora_batch

    driver = RunnerDriver.build(tiny_fp32, tokenizer)
    shape = BaseShape.from_config(tiny_fp32.config)
    for i, (name, rank) in enumerate((("a", 4), ("b", 8), ("c", 16))):
        driver.runner.lora.add(name, load_lora(make_peft_adapter(tiny_fp32, tmp_path / name, seed=40 + i, rank=rank,
                                                                 b_std=0.2), shape))
    adapters = ["a", "b", None, "c", "a", "b", "c", "a", None]
    batch = {row: (PROMPTS[row % 3], adapter) for row, adapter in enumerate(adapters)}
    paths = {}
    for path, threshold in (("wide", 10**6), ("segmented", -1)):
        monkeypatch.setattr(lora_batch, "WIDE_EXTRA_ROWS", threshold)
        plan = driver.runner.lora.prepare([adapter for _, adapter in batch.values()])
        assert (plan.segment_rows == 0) == (path == "wide") and (plan.gather is not None) == (path == "segmented")
        paths[path] = driver.prefill(batch)
    assert torch.equal(paths["wide"], paths["segmented"])
    mix = (("a", 0.5), ("c", 0.5))
    monkeypatch.setattr(lora_batch, "WIDE_EXTRA_ROWS", 10**6)
    assert all(driver.runner.lora.prepare(rows).gather is not None for rows in ([mix, "b"], [mix]))


def test_in_float16_an_adapter_that_overflows_leaves_the_other_rows_of_a_wide_step_alone():
    """The wide path multiplies every row by every adapter's A and zeroes what a row does not use; in
    float16 a large admitted adapter can overflow there (inf * 0 is NaN), so the zeroing is a select."""
    from adapters.lora import LoraWeights
    from server.engine.lora_batch import LoraBank

    shape = BaseShape(num_layers=1, linear_features={"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64),
                                                     "o_proj": (64, 64), "gate_proj": (64, 128),
                                                     "up_proj": (64, 128), "down_proj": (128, 64)})
    bank = LoraBank(torch.device("cpu"), torch.float16, shape, slots=2, max_rank=8)
    assert bank.overflow_guard
    bank.add("huge", LoraWeights(8, {(0, "o_proj"): (torch.full((64, 8), 1000.0), torch.ones(8, 64))}, ("o_proj",),
                                 None))
    bank.add("calm", LoraWeights(8, {(0, "o_proj"): (torch.full((64, 8), 0.01), torch.ones(8, 64))}, ("o_proj",),
                                 None))
    x = torch.full((4, 64), 2.0, dtype=torch.float16)  # huge: x @ A = 128,000, over float16's 65,504
    y = torch.zeros(4, 64, dtype=torch.float16)
    plan = bank.prepare(["huge", "calm", None, "calm"])
    assert plan.segment_rows == 0 and plan.keep is not None
    plan.apply(0, "o", x, (y,))
    assert torch.isinf(y[0]).all()  # its own row overflows
    assert torch.isfinite(y[1:]).all() and not y[2].any()  # the others do not see it
    torch.testing.assert_close(y[1], torch.full((64,), 10.24, dtype=torch.float16), rtol=1e-2, atol=1e-2)
