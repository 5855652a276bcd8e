"""Paged KV cache: block bookkeeping, chunked prefill, prefix reuse, preemption, the memory budget.

What we claim (README, "KV cache") and test here, on CPU:
- a request's greedy tokens do not depend on which requests share its steps;
- nor on how its prompt was cut into chunks, nor on how much of it came from the prefix cache
  (bit-identical logits);
- a preempted request completes (computed again from its tokens); requests that were not preempted
  keep their solo answers, and nobody's cache is corrupted.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters.lora import BaseShape, load_lora
from tests.support.harness import RunnerDriver, make_peft_adapter, wait_until
from server.engine.block_manager import BlockManager, BlockOwner
from server.engine.engine import QueueFull
from server.engine.model_runner import _padded_length
from server.metrics import Metrics
from tests.test_engine import make_engine, make_seq

# ---- block manager ----------------------------------------------------------------------


def owner(tokens, adapter=None) -> BlockOwner:
    return BlockOwner(list(tokens), adapter)


def computed(blocks: BlockManager, seq: BlockOwner) -> BlockOwner:
    """As if the runner had computed every token but the last."""
    seq.num_computed = len(seq.tokens) - 1
    blocks.commit(seq)
    return seq


def test_blocks_follow_tokens_and_come_back():
    blocks = BlockManager(num_blocks=9, block_size=4)
    assert blocks.capacity_tokens == 32 and blocks.num_free == 8
    a = owner(range(10))
    assert blocks.allocate(a) and len(a.block_table) == 3 and blocks.num_used == 3
    assert 0 not in a.block_table  # the padding block is never handed out
    a.tokens += [1, 2]  # 12 tokens: still 3 blocks
    assert blocks.append_slot(a) and len(a.block_table) == 3
    a.tokens.append(3)
    assert blocks.append_slot(a) and len(a.block_table) == 4
    big = owner(range(20))  # needs 5, 4 are free
    assert not blocks.allocate(big) and big.block_table == [] and blocks.num_used == 4
    blocks.free(a)
    assert blocks.num_used == 0 and blocks.allocate(big)


def test_prefix_reuse_counts_and_lru_eviction():
    blocks = BlockManager(num_blocks=7, block_size=4, prefix_caching=True)  # 6 usable blocks
    a = owner(range(12))
    assert blocks.allocate(a)
    computed(blocks, a)  # blocks 0-1 full and committed; the third holds tokens 8-11, position 11 uncomputed
    b = owner([*range(8), 99, 98, 97, 96, 95])
    assert blocks.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8  # shared, not copied
    assert b.block_table[2] != a.block_table[2]
    assert blocks.num_used == 3 + 2  # a's 3 + b's 2 own blocks
    assert blocks.stats.hit_tokens == 8 and blocks.stats.queried_tokens == 12 + 13
    # the same 12 tokens exactly: only 2 blocks can be reused (the last token is computed again)
    c = owner(range(12))
    assert blocks.allocate(c) and c.num_computed == 8
    blocks.free(c)
    blocks.free(b)
    blocks.free(a)
    assert blocks.num_used == 0
    # cached blocks stay until the pool needs them: a request for 6 blocks overwrites all, LRU first
    d = owner(range(100, 124))
    assert blocks.allocate(d) and d.num_computed == 0
    blocks.free(d)
    assert blocks.allocate(c := owner(range(12))) and c.num_computed == 0  # evicted


def test_the_adapter_is_part_of_the_prefix():
    blocks = BlockManager(num_blocks=9, block_size=4, prefix_caching=True)
    a = owner(range(9), "expert-a")
    assert blocks.allocate(a)
    computed(blocks, a)
    other = owner(range(9), "expert-b")
    assert blocks.allocate(other) and other.num_computed == 0
    same = owner(range(9), "expert-a")
    assert blocks.allocate(same) and same.num_computed == 8


def test_prefix_caching_off_reuses_nothing():
    blocks = BlockManager(num_blocks=9, block_size=4, prefix_caching=False)
    a = owner(range(9))
    assert blocks.allocate(a)
    computed(blocks, a)
    b = owner(range(9))
    assert blocks.allocate(b) and b.num_computed == 0 and not set(a.block_table) & set(b.block_table)


def test_padded_lengths_depend_on_the_row_only_and_waste_at_most_half():
    for length in range(1, 5000):
        padded = _padded_length(length)
        assert padded >= length and padded % 64 == 0
        assert padded <= max(64 * -(-length // 64), int(length * 1.5) + 64)
    assert len({_padded_length(n) for n in range(1, 2049)}) <= 10  # few distinct shapes per step


# ---- the runner: chunks and prefix hits do not change a token's numbers ---------------------


@pytest.fixture(scope="module")
def tiny_nf4(tiny_folder):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32, quantization_config=config).eval()


@pytest.mark.parametrize("adapter", [None, "a"])
def test_chunking_and_prefix_hits_give_bit_identical_logits(tiny_nf4, tokenizer, tmp_path, adapter):
    prompt = torch.randint(100, 40000, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    adapter_folder = make_peft_adapter(tiny_nf4, tmp_path / "a", seed=3, b_std=0.2)

    def driver(prefix_caching=False):
        built = RunnerDriver.build(tiny_nf4, tokenizer, tokens=1024, context_window=256, prefix_caching=prefix_caching)
        built.runner.lora.add("a", load_lora(adapter_folder, BaseShape.from_config(tiny_nf4.config)))
        return built

    one_shot = driver().prefill({0: (prompt, adapter)})
    for chunk in (16, 32, 48, 64, 128):
        assert torch.equal(driver().prefill({0: (prompt, adapter)}, chunk=chunk), one_shot), chunk
    cached = driver(prefix_caching=True)
    cached.prefill({"first": (prompt[:70], adapter)})
    cached.release("first")
    assert torch.equal(cached.prefill({0: (prompt, adapter)}), one_shot)
    assert cached.owners[0].block_digests and cached.blocks.stats.hit_tokens == 64  # 4 whole blocks reused
    # the same text under another adapter is not a hit
    other = None if adapter else "a"
    cached.prefill({1: (prompt, other)})
    assert cached.blocks.stats.hit_tokens == 64
    # and a chunk shares its step with other rows without changing: chunks of two prompts in one pass
    together = driver().prefill({0: (prompt, adapter), 1: (prompt[:40], None)}, chunk=32)
    assert torch.equal(together[0], one_shot[0])


# ---- the engine -----------------------------------------------------------------------------


class StepLog:
    """Records what each engine step computed: [(tokens of each item)]."""

    def __init__(self, engine):
        self.steps: list[list[int]] = []

        def wrap(runner):
            inner = runner.step

            def step(items):
                self.steps.append([len(item.token_ids) for item in items])
                return inner(items)

            runner.step = step

        engine.call(wrap).result(10)


def _solo(engine, prompt, max_tokens):
    seq, out = make_seq(prompt, max_tokens=max_tokens)
    engine.submit(seq)
    assert out.done.wait(60)
    return out.text


def _long_prompt(length: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(100, 40000, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_long_prompt_is_prefilled_in_chunks_while_streams_decode(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_step_tokens=32, prefix_caching=False)  # compute it all
    try:
        short = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683]]
        long_prompt = _long_prompt(200)
        solo = [_solo(engine, p, 40) for p in short] + [_solo(engine, long_prompt, 8)]
        log = StepLog(engine)
        seqs = [make_seq(p, max_tokens=40) for p in short]
        for seq, _ in seqs:
            engine.submit(seq)
        assert wait_until(lambda: all(seq.generated >= 3 for seq, _ in seqs), 30, interval=0.001)
        long_seq, long_out = make_seq(long_prompt, max_tokens=8)
        engine.submit(long_seq)
        for _, out in [*seqs, (long_seq, long_out)]:
            assert out.done.wait(60)
        assert [out.text for _, out in seqs] + [long_out.text] == solo  # chunking changed no token
        mixed = [step for step in log.steps if 1 in step and any(n > 1 for n in step)]
        assert len(mixed) >= 200 // 32 - 1  # the prompt took several steps, each also decoding the streams
        assert max(sum(step) for step in log.steps) <= 32
    finally:
        engine.stop()


def test_a_repeated_prompt_reuses_its_prefix(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    try:
        prompt = _long_prompt(100, seed=2)
        first, first_out = make_seq(prompt, max_tokens=6)
        engine.submit(first)
        assert first_out.done.wait(30) and first_out.final.cached_tokens == 0
        again, again_out = make_seq(prompt, max_tokens=6)
        engine.submit(again)
        assert again_out.done.wait(30)
        assert again_out.final.cached_tokens == 96  # six whole blocks; the last 4 tokens computed again
        assert again_out.text == first_out.text
        assert engine.metrics.prefix_hit_tokens._value.get() == 96
        assert engine.metrics.prefix_queried_tokens._value.get() == 200
    finally:
        engine.stop()
    engine = make_engine(tiny_model, tokenizer, prefix_caching=False)
    try:
        for _ in range(2):
            seq, out = make_seq(prompt, max_tokens=6)
            engine.submit(seq)
            assert out.done.wait(30) and out.final.cached_tokens == 0 and out.text == first_out.text
    finally:
        engine.stop()


def test_when_blocks_run_out_the_newest_request_is_preempted_and_still_completes(tiny_model, tokenizer):
    """A pool of 12 blocks (192 tokens) and four requests that need 4 x 76: someone must wait."""
    engine = make_engine(tiny_model, tokenizer, kv_blocks=12)
    prompts = [_long_prompt(36, seed=10 + i) for i in range(4)]
    try:
        solo = [_solo(engine, p, 40) for p in prompts]
        collectors = []
        for prompt in prompts:
            seq, out = make_seq(prompt, max_tokens=40)
            engine.submit(seq)
            collectors.append((seq, out))
        for _, out in collectors:
            assert out.done.wait(60)
        assert all(out.final.finish_reason == "length" and out.final.completion_tokens == 40 for _, out in collectors)
        assert engine.metrics.preemptions._value.get() > 0
        assert any(seq.preemptions for seq, _ in collectors)
        for (seq, out), expected in zip(collectors, solo):
            if not seq.preemptions:  # never preempted: exactly its solo answer (nobody touched its blocks)
                assert out.text == expected
        assert not collectors[0][0].preemptions  # the oldest is never the one preempted
        assert engine.kv_usage() == (0, 12)
    finally:
        engine.stop()


def test_a_flood_of_long_prompts_queues_and_never_deadlocks(tiny_model, tokenizer):
    """More demand than the pool holds several times over, and a bounded queue: every accepted request
    finishes, the rest are refused at once (429 at the edge), the engine ends idle with its pool free."""
    engine = make_engine(tiny_model, tokenizer, max_batch=8, max_queued=6, kv_blocks=20)
    try:
        accepted, refused = [], 0
        for i in range(10):
            seq, out = make_seq(_long_prompt(150, seed=30 + i), max_tokens=20)
            try:
                engine.submit(seq)
                accepted.append(out)
            except QueueFull:
                refused += 1
        assert refused >= 1
        for out in accepted:
            assert out.done.wait(120)
            assert out.final.finish_reason == "length"
        assert wait_until(lambda: engine.idle, 10) and engine.kv_usage()[0] == 0
    finally:
        engine.stop()


def test_concurrent_prompts_sharing_a_system_prompt_reuse_it(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch=8)
    system = _long_prompt(128, seed=5)
    try:
        warm, out = make_seq(system + [42, 43], max_tokens=2)
        engine.submit(warm)
        assert out.done.wait(30)
        outs = []
        for i in range(6):
            seq, collector = make_seq(system + [100 + i, 200 + i, 300 + i], max_tokens=4)
            engine.submit(seq)
            outs.append(collector)
        for collector in outs:
            assert collector.done.wait(30) and collector.final.cached_tokens == 128
    finally:
        engine.stop()


def test_a_request_alone_on_its_expert_has_the_logits_it_has_in_a_mixed_batch(tiny_nf4, tokenizer, tmp_path):
    """Alone, a request's rows take the padded single-adapter path (no gather or scatter); in a mixed batch
    they are gathered into their segment: the logits must be the same bits either way."""
    driver = RunnerDriver.build(tiny_nf4, tokenizer)
    shape = BaseShape.from_config(tiny_nf4.config)
    for name, seed in (("a", 3), ("b", 4)):
        driver.runner.lora.add(name, load_lora(make_peft_adapter(tiny_nf4, tmp_path / name, seed=seed, b_std=0.2),
                                               shape))
    prompts = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683], [1, 22, 33, 44, 55, 66, 77]]
    alone = [driver.prefill({0: (prompts[0], "a")})[0]]
    alone.append(driver.decode({0: 42})[0])
    driver.release(0)
    mixed = [driver.prefill({0: (prompts[0], "a"), 1: (prompts[1], "b"), 2: (prompts[2], None)})[0]]
    mixed.append(driver.decode({0: 42, 1: 43, 2: 44})[0])
    assert [float((lone - batched).abs().max()) for lone, batched in zip(alone, mixed)] == [0.0, 0.0]


def test_a_row_has_the_same_bits_whether_its_adapter_has_one_three_or_six_rows_in_the_step(tiny_nf4, tokenizer,
                                                                                          tmp_path):
    """A decode row on adapter a alone (a lone-stream step, padded), with a's rows interleaved with b's and the
    base's (gathered into a segment of 4), and among six rows of a (a segment of 8): the segment sizes differ,
    the GEMM class (4 rows or more) does not, so the bits are the same."""
    driver = RunnerDriver.build(tiny_nf4, tokenizer)
    shape = BaseShape.from_config(tiny_nf4.config)
    for name, seed in (("a", 3), ("b", 4)):
        driver.runner.lora.add(name, load_lora(make_peft_adapter(tiny_nf4, tmp_path / name, seed=seed, b_std=0.2),
                                               shape))
    prompt = [1, 504, 3575, 282, 4649]
    others = {key: ([1, 22 + key, 33, 44], adapter) for key, adapter in
              [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "a"), (6, "a"), (7, None)]}
    requests = {0: (prompt, "a"), **others}
    logits = {}
    for label, keys in (("alone", [0]), ("three of a, b between", [0, 2, 1, 7, 3]),
                        ("six of a", [6, 1, 2, 0, 3, 4, 5, 7])):
        driver.prefill({key: requests[key] for key in keys})
        logits[label] = driver.decode({key: 42 + key for key in keys})[keys.index(0)]
        for key in keys:
            driver.release(key)
    assert [float((logits["alone"] - other).abs().max()) for other in logits.values()] == [0.0, 0.0, 0.0]


def test_a_rank_8_adapter_has_the_same_bits_beside_adapters_of_higher_rank(tiny_nf4, tokenizer, tmp_path):
    """The step stack takes the highest rank among its adapters: a rank-8 all-linear adapter computes at
    rank 8 alone, at 16 and at 24 beside others (its A and B zero-padded, the single-module groups' A at
    16 columns even at rank 8): the same bits every time."""
    driver = RunnerDriver.build(tiny_nf4, tokenizer)
    shape = BaseShape.from_config(tiny_nf4.config)
    from adapters.lora import LINEAR_MODULES

    for name, rank, seed in (("a", 8, 3), ("b", 16, 4), ("c", 24, 5)):
        folder = make_peft_adapter(tiny_nf4, tmp_path / name, seed=seed, rank=rank, b_std=0.2, targets=LINEAR_MODULES)
        driver.runner.lora.add(name, load_lora(folder, shape))
    prompt = [1, 504, 3575, 282, 4649]
    logits = []
    for company in ([], ["b"], ["c", "b"]):
        requests = {0: (prompt, "a"), **{i + 1: ([1, 22, 33, 44], name) for i, name in enumerate(company)}}
        driver.prefill(requests)
        logits.append(driver.decode({key: 42 for key in requests})[0])
        assert driver.runner.lora._stack.rank == [8, 16, 24][len(company)]
        for key in requests:
            driver.release(key)
    assert [float((logits[0] - other).abs().max()) for other in logits] == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def test_metrics_export_kv_usage():
    metrics = Metrics()
    metrics.watch(running=lambda: 0, waiting=lambda: 0, tiers=lambda: {}, kv_blocks=lambda: (30, 120),
                  kv_block_bytes=lambda: 1000)
    values = {s.name + str(sorted(s.labels.items())): s.value for f in metrics.registry.collect() for s in f.samples}
    assert values["loraplex_kv_cache_usage_ratio[]"] == 0.25
    assert values["loraplex_kv_cache_used_bytes[]"] == 30_000
    assert values["loraplex_kv_cache_blocks[('state', 'total')]"] == 120


def test_metrics_export_the_memory_breakdown():
    from server.metrics import MEMORY_PARTS

    metrics = Metrics()
    parts = {"weights": 123, "kv_cache_pool": 4000, "kv_cache_used": 1000, "adapter_slots": 77}
    metrics.watch(running=lambda: 0, waiting=lambda: 0, tiers=lambda: {}, kv_blocks=lambda: (0, 1),
                  kv_block_bytes=lambda: 1, memory=lambda: parts)
    values = {s.labels["part"]: s.value for f in metrics.registry.collect() for s in f.samples
              if s.name == "loraplex_memory_bytes"}
    assert values == {part: parts.get(part, 0) for part in MEMORY_PARTS}


def test_a_prompt_chunk_is_sized_from_measured_step_times():
    from server.engine.step_cost import INITIAL_CHUNK, StepCost

    cost = StepCost(max_step_tokens=512, slowdown=2.0)
    assert cost.prompt_budget(0) == 512  # nobody decodes: nobody waits
    assert cost.prompt_budget(8) == INITIAL_CHUNK  # decoding, nothing measured yet
    cost.observe(decode_rows=8, prompt_tokens=0, seconds=0.040)
    cost.observe(decode_rows=8, prompt_tokens=100, seconds=0.240)  # 2 ms per prompt token on top
    assert cost.prompt_budget(8) == 20  # 40 ms of prompt work: a step of about 2x a decode step
    fast = StepCost(max_step_tokens=512, slowdown=2.0)  # a GPU: a prompt token costs next to nothing
    fast.observe(decode_rows=64, prompt_tokens=0, seconds=0.020)
    fast.observe(decode_rows=64, prompt_tokens=256, seconds=0.025)
    assert fast.prompt_budget(64) == 512 - 64
    off = StepCost(max_step_tokens=512, slowdown=0)
    off.observe(8, 0, 0.04)
    off.observe(8, 100, 0.24)
    assert off.prompt_budget(8) == 504
