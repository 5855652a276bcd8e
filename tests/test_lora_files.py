"""Reading PEFT adapter folders: what is accepted, what is refused and why."""
import json

import pytest
import torch
from safetensors.torch import save_file

from adapters.lora import AdapterError, BaseShape, load_lora

SHAPE = BaseShape(num_layers=2, linear_features={
    "q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
    "gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128),
})
PREFIX = "base_model.model.model.layers"


def write_adapter(folder, tensors, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def qv_tensors(rank=4, out=128):
    return {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, 128),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(out, rank),
    }


def test_reads_pairs_transposed_with_scaling_folded_into_b(tmp_path):
    tensors = qv_tensors()
    weights = load_lora(write_adapter(tmp_path / "a", tensors), SHAPE)
    a, b = weights.pairs[(0, "q_proj")]
    assert weights.rank == 4 and weights.target_modules == ("q_proj",)
    torch.testing.assert_close(a, tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"].t())
    torch.testing.assert_close(b, 2.0 * tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"].t())


def test_rslora_scaling_is_alpha_over_sqrt_rank(tmp_path):
    tensors = qv_tensors()
    weights = load_lora(write_adapter(tmp_path / "a", tensors, r=4, lora_alpha=6, use_rslora=True), SHAPE)
    _, b = weights.pairs[(0, "q_proj")]
    torch.testing.assert_close(b, 3.0 * tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"].t())  # 6 / sqrt(4)


def test_pickle_file_is_refused(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="pickle"):
        load_lora(folder, SHAPE)


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (qv_tensors(out=96), {}, "do not fit"),
        ({f"{PREFIX}.0.self_attn.x_proj.lora_A.weight": torch.randn(4, 128),
          f"{PREFIX}.0.self_attn.x_proj.lora_B.weight": torch.randn(128, 4)}, {}, "x_proj"),
        ({f"{PREFIX}.7.self_attn.q_proj.lora_A.weight": torch.randn(4, 128),
          f"{PREFIX}.7.self_attn.q_proj.lora_B.weight": torch.randn(128, 4)}, {}, "layer 7"),
        ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 128)}, {}, "without its partner"),
        ({"base_model.model.lm_head.weight": torch.randn(4, 4)}, {}, "unsupported tensor"),
        (qv_tensors(), {"peft_type": "IA3"}, "only LORA"),
        (qv_tensors(), {"use_dora": True}, "DoRA"),
    ],
)
def test_refusals_say_what_is_wrong(tmp_path, tensors, config, message):
    with pytest.raises(AdapterError, match=message):
        load_lora(write_adapter(tmp_path / "a", tensors, **config), SHAPE)


def test_rank_limit(tmp_path):
    with pytest.raises(AdapterError, match="exceeds the configured max rank 2"):
        load_lora(write_adapter(tmp_path / "a", qv_tensors()), SHAPE, max_rank=2)


def test_corrupt_safetensors_is_refused(tmp_path):
    folder = write_adapter(tmp_path / "a", qv_tensors())
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="safetensors"):
        load_lora(folder, SHAPE)


A_KEY = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
B_KEY = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("bad, message", [
    ({B_KEY: torch.full((128, 4), float("nan"))}, "NaN or infinite"),
    ({A_KEY: torch.full((4, 128), float("inf"))}, "NaN or infinite"),
    ({B_KEY: torch.full((128, 4), 1e30)}, "magnitude"),
    ({A_KEY: torch.zeros(0, 128), B_KEY: torch.zeros(128, 0)}, "rank is 0"),
    ({A_KEY: torch.tensor(1.0)}, "2-d floating-point"),
    ({A_KEY: torch.zeros(2, 4, 128)}, "2-d floating-point"),
    ({A_KEY: torch.ones(4, 128, dtype=torch.int32)}, "2-d floating-point"),
])
def test_tensors_with_bad_values_or_shapes_are_refused(tmp_path, bad, message):
    with pytest.raises(AdapterError, match=message):
        load_lora(write_adapter(tmp_path / "a", {**qv_tensors(), **bad}), SHAPE)


def test_a_huge_alpha_that_scales_b_out_of_range_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="scaling"):
        load_lora(write_adapter(tmp_path / "a", qv_tensors(), lora_alpha=1e6), SHAPE)


@pytest.mark.parametrize("config, message", [
    ({"r": "abc"}, "'r' must be|r must be"),
    ({"r": True}, "r must be"),
    ({"lora_alpha": None}, "lora_alpha must be"),
    ({"lora_alpha": "x"}, "lora_alpha must be"),
    ({"lora_alpha": 1e308}, "lora_alpha must be"),
    ({"lora_alpha": 0}, "lora_alpha must be"),
    ({"alpha_pattern": {"(": 4}}, "not a valid pattern"),
    ({"alpha_pattern": [1, 2]}, "alpha_pattern must be an object"),
    ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
    ({"base_model_name_or_path": 5}, "base_model_name_or_path must be a string"),
    ({"use_rslora": "yes"}, "use_rslora"),
])
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, config, message):
    with pytest.raises(AdapterError, match=message):
        load_lora(write_adapter(tmp_path / "a", qv_tensors(), **config), SHAPE)


def test_a_config_nested_too_deeply_is_refused(tmp_path):
    folder = write_adapter(tmp_path / "a", qv_tensors())
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_lora(folder, SHAPE)


def test_nan_alpha_in_json_is_refused(tmp_path):
    folder = write_adapter(tmp_path / "a", qv_tensors())
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}')
    with pytest.raises(AdapterError, match="lora_alpha must be"):
        load_lora(folder, SHAPE)


def test_alpha_pattern_applies_per_module(tmp_path):
    weights = load_lora(write_adapter(tmp_path / "a", qv_tensors(), alpha_pattern={"q_proj": 16}), SHAPE)
    b = weights.pairs[(0, "q_proj")][1]
    from safetensors.torch import load_file

    raw_b = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))[B_KEY]
    torch.testing.assert_close(b, 4.0 * raw_b.t())  # alpha 16 / rank 4, not the default 8 / 4
