"""The Triton LoRA kernels (server/engine/lora_kernels.py), run by Triton's interpreter on this CPU,
against plain torch math and against the torch path of the model runner."""
import pytest
import torch

from adapters.lora import BaseShape, load_lora
from tests.support.harness import RunnerDriver, make_peft_adapter
from server.engine import lora_kernels  # interpreted: conftest sets TRITON_INTERPRET (triton: a dev dependency)
from server.engine.model_runner import ModelRunner

PROMPTS = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683], [1, 22, 33, 44, 55, 66, 77], [1, 5, 6]]


@pytest.mark.parametrize("split_k", [1, 3])
def test_shrink_and_expand_match_torch_per_row(split_k):
    """Segments of different slots and ranks, rows with no adapter between them, one segment longer than
    a block of rows, mixture weights; split K (the GPU's few-rows path, atomics) gives the same."""
    generator = torch.Generator().manual_seed(1)
    pool_rank, modules, k, n = 32, 3, 200, 80
    width = modules * pool_rank
    a_size = k * width
    pool = torch.randn(4, a_size + pool_rank * n, generator=generator) * 0.1
    x = torch.randn(40, k, generator=generator)
    y = torch.randn(40, n, generator=generator)
    ranks = {3: 32, 1: 16}
    for slot, rank in ranks.items():  # past an adapter's rank its slot is zero, as LoraBank.add leaves it
        pool[slot, :a_size].view(k, modules, pool_rank)[:, :, rank:] = 0
        pool[slot, a_size:].view(pool_rank, n)[rank:] = 0
    rows = {3: [(r, 1.0 + r / 10) for r in range(0, 40, 2)],  # 20 rows: two blocks of 16
            1: [(5, 0.5), (9, 2.0), (33, -1.0)]}
    segments = lora_kernels.Segments(rows, ranks, torch.device("cpu"))
    hidden = lora_kernels.shrink(x, pool, 0, width, pool_rank, segments,
                                 torch.empty(segments.entries, width), split_k=split_k)
    got = y.clone()
    lora_kernels.expand(hidden, 2 * pool_rank, pool_rank, pool, a_size, segments, got)  # the third module

    want = y.clone()
    entry = 0
    for slot, members in rows.items():
        a = pool[slot, :a_size].view(k, width)
        b = pool[slot, a_size:].view(pool_rank, n)
        for row, weight in members:
            full = x[row] @ a
            rank = ranks[slot]
            torch.testing.assert_close(hidden[entry].view(modules, pool_rank)[:, :rank],
                                       full.view(modules, pool_rank)[:, :rank], rtol=1e-5, atol=1e-4)
            want[row] += weight * (full[2 * pool_rank :] @ b)
            entry += 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    untouched = [r for r in range(40) if r not in {5, 9, 33} and r % 2]
    assert torch.equal(got[untouched], y[untouched])  # rows with no adapter are not written


# A base whose K (1,088 and 1,500) gives each of 8 splits two or more blocks of 64, unevenly, and whose
# widths are not multiples of a block: the masks and the atomic split-K path all do work.
CHECK_SHAPE = BaseShape(num_layers=1, linear_features={
    "q_proj": (1088, 256), "k_proj": (1088, 80), "v_proj": (1088, 80), "o_proj": (256, 1088),
    "gate_proj": (1088, 1500), "up_proj": (1088, 1500), "down_proj": (1500, 1088)})


# fp16, not bf16: Triton's interpreter computes a bf16 tl.dot wrongly on this CPU (off by ~1e9 in the
# self-check, see test_the_interpreter_cannot_check_bf16), so fp16 stands in for the GPU's serving dtype: the
# same 16-bit loads, fp32 accumulation and rounding of the shrink's result before the expand.
@pytest.mark.parametrize("split_k", [1, 4, 8])
def test_the_self_check_passes_in_fp16_at_every_split_of_k(split_k):
    """Every group of the base at its own K and width, a segment over two row blocks, an adapter below the
    pool's rank, rows with no adapter, mixture weights and the static segments of a captured step."""
    assert lora_kernels.self_check(torch.device("cpu"), torch.float16, CHECK_SHAPE, 16, split_k=split_k) is None


def test_the_interpreter_cannot_check_bf16():
    """Why the suite checks fp16: if this starts passing, the interpreter got bf16 right and bf16 can be tested."""
    problem = lora_kernels.self_check(torch.device("cpu"), torch.bfloat16, None, 16)
    assert problem is not None and "differ" in problem


def test_the_self_check_catches_wrong_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert lora_kernels.self_check(cpu, torch.float32) is None
    real_expand = lora_kernels.expand

    def unscaled(hidden, column, rank, pool, b_offset, segments, y):  # mixture weights ignored
        segments.scale = None
        real_expand(hidden, column, rank, pool, b_offset, segments, y)

    monkeypatch.setattr(lora_kernels, "expand", unscaled)
    problem = lora_kernels.self_check(cpu, torch.float16, CHECK_SHAPE, 16, split_k=4)
    assert "differ" in problem and "mixture weights" in problem and "split-K 4" in problem
    monkeypatch.setattr(lora_kernels, "expand", lambda *args: None)  # a kernel that adds nothing
    problem = lora_kernels.self_check(cpu, torch.float16, CHECK_SHAPE, 16)
    assert "differ" in problem and "qkv (K 1088, N 80" in problem


def test_a_failing_self_check_falls_back_to_torch_with_a_log_line_naming_it(monkeypatch, caplog):
    """What `lora_kernels: auto` does on a GPU when the check fails (the same function; on CPU `auto` never
    tries Triton): the torch kernels serve, and the warning says which problem failed; `triton` refuses."""
    from server.engine.lora_batch import triton_or_torch

    cpu = torch.device("cpu")
    assert triton_or_torch("auto", cpu, torch.float16, CHECK_SHAPE, 16)[0] == "triton"
    monkeypatch.setattr(lora_kernels, "expand", lambda *args: None)
    with caplog.at_level("WARNING", logger="server.engine.lora_batch"):
        assert triton_or_torch("auto", cpu, torch.float16, CHECK_SHAPE, 16) == ("torch", None)
    assert "LoRA kernels: torch, not Triton: LoRA kernels differ from torch" in caplog.text
    assert "qkv (K 1088" in caplog.text
    with pytest.raises(ValueError, match="triton cannot be used here: LoRA kernels differ"):
        triton_or_torch("triton", cpu, torch.float16, CHECK_SHAPE, 16)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def test_the_runner_on_triton_kernels_gives_the_torch_paths_logits(tiny, tokenizer, tmp_path):
    """Mixed adapters of different ranks and targets, a base row, a mixture row; prefill, then decode
    steps where the set of adapters changes: the kernels read the pool directly and need no step stack."""
    shape = BaseShape.from_config(tiny.config)
    adapters = {
        "a": load_lora(make_peft_adapter(tiny, tmp_path / "a", seed=1, rank=4, b_std=0.2), shape),
        "b": load_lora(make_peft_adapter(tiny, tmp_path / "b", seed=2, rank=24, b_std=0.2,
                                         targets=("q_proj", "v_proj", "o_proj", "up_proj")), shape),
    }
    drivers = {}
    for kernels in ("torch", "triton"):
        runner = ModelRunner(tiny, tokenizer, 65, 16, 128, lora_kernels=kernels)
        assert runner.lora.kernels == kernels
        for name, weights in adapters.items():
            runner.lora.add(name, weights)
        drivers[kernels] = RunnerDriver(runner)
    batch = {0: (PROMPTS[0], "a"), 1: (PROMPTS[1], None), 2: (PROMPTS[2], "b"), 3: (PROMPTS[3], (("a", 0.7), ("b", 0.3)))}
    torch_logits, triton_logits = (drivers[k].prefill(batch) for k in ("torch", "triton"))
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(triton_logits[0], drivers["triton"].prefill({9: (PROMPTS[0], None)})[0], atol=1e-3)
    tokens = {key: int(t) for key, t in zip(batch, torch_logits.argmax(-1))}
    for step in range(3):
        if step == 1:  # "a"'s rows finish: the set of adapters changes
            for driver in drivers.values():
                driver.release(0)
            tokens.pop(0)
        torch_logits, triton_logits = (drivers[k].decode(tokens) for k in ("torch", "triton"))
        torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)
        tokens = {key: int(t) for key, t in zip(tokens, torch_logits.argmax(-1))}
    assert drivers["triton"].runner.lora._stack.flat is None  # never built a step stack


def test_kernel_choice(tiny, tokenizer, monkeypatch):
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(tiny.config)
    with_stack = LoraBank.bytes_needed(shape, 8, 16, torch.bfloat16)
    assert LoraBank.bytes_needed(shape, 8, 16, torch.bfloat16, step_stack=False) * 2 == with_stack  # Triton: pool only
    assert ModelRunner(tiny, tokenizer, 9, 16, 128).lora.kernels == "torch"
    # no CUDA: the CPU kernel where it runs for this model's dtype (test_cpu_lora.py), else torch
    from server.engine import cpu_lora

    expected = "cpu" if not cpu_lora.usable(torch.device("cpu"), tiny.model.norm.weight.dtype, 16) else "torch"
    assert ModelRunner(tiny, tokenizer, 9, 16, 128, lora_kernels="auto").lora.kernels == expected
    monkeypatch.setattr(lora_kernels, "self_check", lambda *args: "broken here")
    with pytest.raises(ValueError, match="triton cannot be used here: broken here"):
        ModelRunner(tiny, tokenizer, 9, 16, 128, lora_kernels="triton")


def test_staged_loads_lay_out_each_adapter_as_the_direct_copy_does(tiny, tmp_path):
    """The GPU load path (one pinned staging buffer, reused; one copy per adapter) run on CPU: after a
    rank-24 all-linear adapter, a rank-4 adapter on three linears gets a slot equal to a direct copy
    (nothing of the first one is left in the reused staging buffer), and so does a third after a removal."""
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(tiny.config)
    weights = [load_lora(make_peft_adapter(tiny, tmp_path / "a", seed=1, rank=24, b_std=0.2), shape),
               load_lora(make_peft_adapter(tiny, tmp_path / "b", seed=2, rank=4, b_std=0.2,
                                           targets=("q_proj", "v_proj", "down_proj")), shape),
               load_lora(make_peft_adapter(tiny, tmp_path / "c", seed=3, rank=8, b_std=0.2), shape)]
    banks = {staged: LoraBank(torch.device("cpu"), torch.float32, shape, slots=3, max_rank=32) for staged in (0, 1)}
    banks[1].staged_loads = True
    for bank in banks.values():
        bank.pool.fill_(float("nan"))  # what torch.empty may hold: every slot must be written whole
        bank.add("a", weights[0])
        bank.add("b", weights[1])
        bank.remove("a")
        bank.add("c", weights[2])
    assert banks[1]._staging is not None and banks[0]._staging is None
    for name in ("b", "c"):
        slots = [bank._residents[name].slot for bank in banks.values()]
        assert torch.equal(banks[0].pool[slots[0]], banks[1].pool[slots[1]])
        assert banks[0]._residents[name] == banks[1]._residents[name]


@pytest.mark.parametrize("staged", [False, True])
def test_a_load_writes_the_adapters_rank_not_the_slot(tiny, tmp_path, staged):
    """Slots of rank 64: a rank-8 adapter sends and writes a rank-8 share of the slot; a slot reused after a
    rank-24 all-linear adapter is zeroed only where that one reached and the next does not, and ends equal to
    a slot that never held anything else (nothing stale is read by either kernel path)."""
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(tiny.config)
    first = load_lora(make_peft_adapter(tiny, tmp_path / "a", seed=1, rank=24, b_std=0.2,
                                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj")), shape)
    second = load_lora(make_peft_adapter(tiny, tmp_path / "b", seed=2, rank=8, b_std=0.2,
                                         targets=("q_proj", "v_proj", "down_proj")), shape)

    def bank():
        made = LoraBank(torch.device("cpu"), torch.float32, shape, slots=1, max_rank=64, grow=False)  # a GPU's pool
        made.staged_loads = staged
        made.pool.fill_(float("nan"))  # what torch.empty may hold
        return made

    reused, fresh = bank(), bank()
    slot_bytes = reused.pool[0].numel() * 4
    reused.add("a", first)
    assert reused.last_load["slot_bytes_written"] == slot_bytes + sum(a.numel() + b.numel()
                                                                      for a, b in first.pairs.values()) * 4
    reused.remove("a")
    reused.add("b", second)
    fresh.add("b", second)
    assert torch.equal(reused.pool[0], fresh.pool[0])
    second_bytes = sum(a.numel() + b.numel() for a, b in second.pairs.values()) * 4
    assert reused.last_load["host_to_device_bytes"] == (second_bytes if staged else 0)
    assert second_bytes < slot_bytes / 8  # rank 8 of 64, three linears of seven
    first_rank24 = sum(a.numel() + b.numel() for a, b in first.pairs.values()) * 4
    assert reused.last_load["slot_bytes_written"] == second_bytes + first_rank24  # a's reach zeroed, b written
    again = bank()
    again.add("b", second)
    again.remove("b")
    again.add("b2", second)  # same reach: overwritten in place, nothing zeroed
    assert again.last_load["slot_bytes_written"] == second_bytes and torch.equal(again.pool[0], fresh.pool[0])


def test_cpu_slots_are_sized_to_the_highest_rank_registered(tiny, tmp_path):
    """On a CPU the slots start small and grow when a higher-rank adapter arrives; what the adapters already
    loaded compute is unchanged (bit for bit), and a slot's memory follows the largest rank, not max_rank."""
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(tiny.config)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    low = load_lora(make_peft_adapter(tiny, tmp_path / "low", seed=1, rank=8, b_std=0.2, targets=targets), shape)
    high = load_lora(make_peft_adapter(tiny, tmp_path / "high", seed=2, rank=24, b_std=0.2, targets=targets), shape)
    bank = LoraBank(torch.device("cpu"), torch.float32, shape, slots=4, max_rank=64)
    fixed = LoraBank(torch.device("cpu"), torch.float32, shape, slots=4, max_rank=64, grow=False)
    bank.add("low", low)
    fixed.add("low", low)
    assert bank.layout.rank == 8 and bank.memory()[1] * 6 < fixed.memory()[1]  # rank 8 of 64 (A at least 16 wide)
    x = torch.randn(4, shape.linear_features["q_proj"][0])

    def deltas(which, names):
        outputs = tuple(torch.zeros(4, shape.linear_features[m][1]) for m in ("q_proj", "k_proj", "v_proj"))
        which.prepare(names).apply(0, "qkv", x, outputs)
        return outputs

    before = deltas(bank, ["low"] * 4)
    bank.add("high", high)
    assert bank.layout.rank == 24
    for got, want in zip(deltas(bank, ["low"] * 4), before):
        assert torch.equal(got, want)
    fixed.add("high", high)
    mixed = ["low", "high", "low", "high"]
    for got, want in zip(deltas(bank, mixed), deltas(fixed, mixed)):
        assert torch.equal(got, want)
