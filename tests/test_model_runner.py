"""The runner's own forward pass against Hugging Face's, and the batched LoRA against PEFT."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters.lora import BaseShape, load_lora
from loadtests.harness import RunnerDriver, make_peft_adapter

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
