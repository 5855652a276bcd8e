"""QLoRA training on a tiny Llama: label mask, exact resume, bad data, the saved adapter, merge."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from training.chat_data import IGNORE, DataError, encode_conversation, load_chat_jsonl
from adapters.lora import BaseShape, load_lora
from training.merge import merge
from training.train import TrainConfig, train
from tests.support.harness import REPO
from server.experts.spec import ExpertRegistration
from tests.support.harness import RunnerDriver

IM_END = 2
CHATS = [
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": '{"answer": 4}'}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
     {"role": "assistant", "content": '{"answer": "Lima"}'}, {"role": "user", "content": "And Chile?"},
     {"role": "assistant", "content": '{"answer": "Santiago"}'}],
    [{"role": "user", "content": "Color of snow?"}, {"role": "assistant", "content": '{"answer": "white"}'}],
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS * 4))
    return path


def test_labels_cover_assistant_turns_and_their_end_token_only(tokenizer):
    example = encode_conversation(tokenizer, CHATS[1], {IM_END})
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    expected = []
    for answer in ('{"answer": "Lima"}', '{"answer": "Santiago"}'):
        expected += tokenizer.encode(answer, add_special_tokens=False) + [IM_END]
    assert learned == expected
    assert example.labels.count(IM_END) == 2 and example.input_ids.count(IM_END) == 5  # system+2 user turns masked
    assert all(label == IGNORE for label in example.labels[: example.input_ids.index(IM_END) + 1])


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}', "{oops"],
         "line 2: not valid JSON"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: no assistant turn"),
        (['{"messages": [{"role": "robot", "content": "hi"}]}'], "line 1: every message needs a role"),
        (['{"text": "hi"}'], 'line 1: expected an object with a non-empty "messages"'),
        (['{"messages": [{"role": "user", "content": "' + "word " * 400 + '"}, {"role": "assistant", "content": "x"}]}'],
         "line 1: "),
    ],
)
def test_bad_data_names_the_line(tokenizer, tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_chat_jsonl(path, tokenizer, {IM_END}, max_length=256)


def test_cli_reports_bad_data_without_a_traceback(tmp_path, tiny_folder):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = subprocess.run([sys.executable, "-m", "server.startup.cli", "train", "--data", str(path), "--name", "x",
                             "--out", str(tmp_path / "out"), "--base", str(tiny_folder)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "line 1: no assistant turn" in result.stderr
    assert "Traceback" not in result.stderr


def tiny_config(tiny_folder, data_file, out, **overrides):
    settings = dict(data=str(data_file), name="tiny-json", out=str(out), base_model=str(tiny_folder), rank=4,
                    steps=8, batch_size=4, lr=5e-3, checkpoint_every=2, progress=False,
                    description="JSON answers", examples=["Answer in JSON"], stop=["</json>"])
    return TrainConfig(**{**settings, **overrides})


def test_resume_follows_the_uninterrupted_schedule_exactly(tiny_folder, data_file, tmp_path):
    straight = train(tiny_config(tiny_folder, data_file, tmp_path / "straight"))
    first = train(tiny_config(tiny_folder, data_file, tmp_path / "resumed", stop_after=3))
    assert first.steps_done == 3 and not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    resumed = train(tiny_config(tiny_folder, data_file, tmp_path / "resumed", resume=True))
    assert resumed.steps_done == straight.steps_done == 8
    assert resumed.lr_history == straight.lr_history
    assert len(set(straight.lr_history)) > 4  # a real schedule (warm-up, decay), not a constant
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses))
    shape = BaseShape.from_config(AutoModelForCausalLM.from_pretrained(tiny_folder).config)
    a = load_lora(tmp_path / "straight", shape)
    b = load_lora(tmp_path / "resumed", shape)
    for key in a.pairs:  # A and B alike
        torch.testing.assert_close(a.pairs[key][0], b.pairs[key][0])
        torch.testing.assert_close(a.pairs[key][1], b.pairs[key][1])


def test_cli_stop_after_then_resume_equals_an_uninterrupted_run(tiny_folder, data_file, tmp_path, capsys):
    """`loraplex train --stop-after` then the same command with `--resume`, through the command line."""
    from server.startup.cli import main

    def cli(out, *extra):
        return main(["train", "--data", str(data_file), "--name", "x", "--out", str(out), "--base", str(tiny_folder),
                     "--rank", "4", "--steps", "6", "--batch-size", "4", "--lr", "0.01", "--max-length", "64", *extra])

    assert cli(tmp_path / "straight") == 0
    assert cli(tmp_path / "resumed", "--stop-after", "2") == 0
    assert "stopped (resume with --resume): 2/6 steps" in capsys.readouterr().out
    assert cli(tmp_path / "resumed", "--resume") == 0
    assert "finished: 6/6 steps" in capsys.readouterr().out
    shape = BaseShape.from_config(AutoModelForCausalLM.from_pretrained(tiny_folder).config)
    a, b = load_lora(tmp_path / "straight", shape), load_lora(tmp_path / "resumed", shape)
    assert a.pairs.keys() == b.pairs.keys()
    for key in a.pairs:
        torch.testing.assert_close(a.pairs[key][0], b.pairs[key][0])
        torch.testing.assert_close(a.pairs[key][1], b.pairs[key][1])


def test_training_learns_and_the_adapter_registers_and_serves(tiny_folder, data_file, tmp_path, tokenizer):
    result = train(tiny_config(tiny_folder, data_file, tmp_path / "out", steps=30))
    assert result.losses[-1] < result.losses[0] - 1.0  # a random tiny model: learning, not mastery
    metadata = json.loads((tmp_path / "out" / "expert.json").read_text())
    registration = ExpertRegistration(**metadata, path=str(tmp_path / "out"))  # POST /v1/adapters takes it as is
    assert registration.stop == ["</json>"] and registration.examples == ["Answer in JSON"]
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    driver = RunnerDriver.build(model, tokenizer)
    weights = load_lora(tmp_path / "out", BaseShape.from_config(model.config))
    assert weights.rank == 4 and len(weights.target_modules) == 7
    driver.runner.lora.add("tiny-json", weights)
    prompt = tokenizer.apply_chat_template(CHATS[0][:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    logits = driver.prefill({0: (prompt, "tiny-json"), 1: (prompt, None)})
    assert not torch.allclose(logits[0], logits[1])


def test_merge_round_trip_matches_the_adapter_on_the_dequantized_base(tiny_folder, data_file, tmp_path):
    from peft import PeftModel

    train(tiny_config(tiny_folder, data_file, tmp_path / "adapter", steps=10))
    merged_dir = merge(tmp_path / "adapter", tmp_path / "merged", base_model=str(tiny_folder))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no peft or bnb
    # reference: the same dequantized NF4 weights with the adapter applied by peft, unmerged
    zero = tmp_path / "zero"
    zero.mkdir()
    trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in trained.items()},
              str(zero / "adapter_model.safetensors"))
    (zero / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    dequantized_base = merge(zero, tmp_path / "dequantized", base_model=str(tiny_folder))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dequantized_base),
                                          tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 47, 198]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_merged_demo_expert_greedy_matches_the_served_expert(tmp_path, smollm_folder, cache_dir):
    """The merged pirate model, in plain transformers, answers like the server's NF4 + LoRA path."""
    from models.base_model import EMBEDDED_BASE, load_base

    adapter = REPO / "training" / "demo" / "pirate" / "adapter"
    merged_dir = merge(adapter, tmp_path / "merged", cache_dir=cache_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    # NF4, as merge() dequantizes and as `loraplex serve` runs on a GPU (a CPU serves int4 groups by default:
    # other roundings of the same weights, so greedy answers may part after a few tokens); attention as on a GPU
    # too, the gather-and-matmul path whose sums match transformers' eager attention (the CPU kernel's sum in
    # another order, and a near-tie then flips a greedy token: what this test checks is the merge)
    served = load_base(EMBEDDED_BASE, quantization="nf4", compute_dtype="float32", cache_dir=cache_dir)
    driver = RunnerDriver.build(served.model, served.tokenizer, context_window=512, attention="torch")
    driver.runner.lora.add("pirate", load_lora(adapter, BaseShape.from_config(served.model.config)))
    prompts = json.loads((REPO / "training" / "demo" / "pirate" / "heldout.json").read_text())["prompts"][:4]
    for prompt in prompts:
        ids = served.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        logits = driver.prefill({0: (ids, "pirate")})
        tokens = [int(logits[0].argmax())]
        while len(tokens) < 24 and tokens[-1] != IM_END:
            logits = driver.decode({0: tokens[-1]})
            tokens.append(int(logits[0].argmax()))
        generated = merged.generate(torch.tensor([ids]), max_new_tokens=len(tokens), do_sample=False)
        assert generated[0, len(ids):].tolist()[: len(tokens)] == tokens
