"""The CPU LoRA kernel (server/engine/cpu_lora.py, `lora_kernels: cpu`): the same deltas as the torch path up to
float32 rounding, mixtures included, and a row's bits independent of what shares its step."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine import cpu_lora
from server.engine.lora_batch import choose_kernels
from tests.support.harness import RunnerDriver, make_peft_adapter

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = pytest.mark.skipif(cpu_lora.load()[0] is None, reason="the CPU LoRA kernel does not run here")


@pytest.fixture(scope="module")
def model_and_adapters(tiny_folder, tmp_path_factory):
    from adapters.lora import BaseShape, load_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    shape = BaseShape.from_config(model.config)
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {
        "a": load_lora(make_peft_adapter(model, folder / "a", seed=1, rank=8, targets=ALL_LINEARS), shape),
        "b": load_lora(make_peft_adapter(model, folder / "b", seed=2, rank=16, targets=("q_proj", "down_proj")), shape),
        "c": load_lora(make_peft_adapter(model, folder / "c", seed=3, rank=8, targets=("v_proj", "up_proj")), shape),
    }
    return model, adapters


def _driver(model, tokenizer, adapters, kernels):
    driver = RunnerDriver.build(model, tokenizer, lora_kernels=kernels)
    assert driver.runner.lora.kernels == kernels
    for name, weights in adapters.items():
        driver.runner.lora.add(name, weights)
    return driver


PROMPTS = {0: ([1, 504, 3575, 282], "a"), 1: ([1, 22, 33, 44, 55, 66, 77, 88, 99], None),
           2: ([1, 9690, 198], "b"), 3: ([1, 7, 8, 9, 10], (("a", 0.5), ("c", 0.25))),
           4: ([1, 11, 12], "c"), 5: ([1, 13, 14, 15, 16, 17], "a"), 6: ([1, 5, 6], (("b", 1.0),))}


def test_the_kernel_computes_what_the_torch_path_does(model_and_adapters, tokenizer):
    """Against the float32 torch path, on prefill and decode rows: the rows without an adapter exactly, the
    others within a small fraction of what their adapters change (the kernel's stack is bf16)."""
    model, adapters = model_and_adapters
    results = {}
    for kernels in ("cpu", "torch"):
        driver = _driver(model, tokenizer, adapters, kernels)
        prefill = driver.prefill(PROMPTS)
        results[kernels] = (prefill, driver.decode({key: 7 for key in PROMPTS}))
    base = _driver(model, tokenizer, {}, "torch")
    bare = {key: (prompt, None) for key, (prompt, _) in PROMPTS.items()}
    results["base"] = (base.prefill(bare), base.decode({key: 7 for key in PROMPTS}))
    for ours, theirs, plain in zip(results["cpu"], results["torch"], results["base"]):
        for index, (_, adapter) in enumerate(PROMPTS.values()):
            if adapter is None:
                assert torch.equal(ours[index], theirs[index])
                continue
            change = (theirs[index] - plain[index]).abs().max()
            assert change > 0.05  # the adapters really change these rows
            assert (ours[index] - theirs[index]).abs().max() <= 0.01 * change, index


def test_a_row_gets_the_same_bits_whatever_shares_its_step(model_and_adapters, tiny_folder, tokenizer):
    """Alone, or beside rows on other adapters, on the base and on mixtures (which change how rows are put in
    items of four): the same logits, bit for bit, in prefill and decode, on the int4 base (whose linears are
    batch-invariant too). A mixture of one adapter at weight 1 is that adapter."""
    from models.base_model import load_int4

    _, adapters = model_and_adapters
    driver = _driver(load_int4(tiny_folder, torch.float32).eval(), tokenizer, adapters, "cpu")
    alone = {key: driver.prefill({key: request})[0] for key, request in PROMPTS.items()}
    together = driver.prefill(PROMPTS)
    for index, key in enumerate(PROMPTS):
        assert torch.equal(together[index], alone[key]), key
    steps_alone = {key: driver.decode({key: 7})[0] for key in PROMPTS}
    for key, request in PROMPTS.items():
        driver.prefill({key: request})
    steps_together = driver.decode({key: 7 for key in PROMPTS})
    for index, key in enumerate(PROMPTS):
        assert torch.equal(steps_together[index], steps_alone[key]), key
    single = driver.prefill({0: ([1, 5, 6], "b")})[0]
    assert torch.equal(single, alone[6])


def test_the_setting_chooses_the_kernel_where_it_can_run():
    cpu = torch.device("cpu")
    assert choose_kernels("auto", cpu, torch.float32)[0] == "cpu"
    assert choose_kernels("cpu", cpu, torch.float32)[0] == "cpu"
    assert choose_kernels("torch", cpu, torch.float32)[0] == "torch"
    assert choose_kernels("auto", cpu, torch.bfloat16)[0] == "torch"  # the kernel computes in float32
    with pytest.raises(ValueError, match="cpu cannot be used here"):
        choose_kernels("cpu", cpu, torch.bfloat16)
