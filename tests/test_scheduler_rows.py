"""The order of a step's decode rows (server/engine/scheduler.py): grouped by adapter, so the LoRA step can use
the batch as its own segment layout (server/engine/lora_batch.py)."""
import torch

from server.engine.block_manager import BlockManager
from server.engine.lora_batch import LoraBank
from server.engine.sampling import SamplingParams, make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence


def _seq(n: int, adapter: str | None, mix=()) -> Sequence:
    seq = Sequence(f"r{n}", [1, 2, 3], adapter, SamplingParams(max_tokens=8), frozenset(),
                   make_generator(0, torch.device("cpu")), lambda out: None, adapter_mix=mix)
    seq.tokens = list(seq.prompt_ids)
    return seq


def _decode_step(scheduler: Scheduler, seqs: list[Sequence]):
    scheduler.waiting.extend(seqs)
    step = scheduler.schedule(lambda key, in_use: True)  # every prompt read
    for seq, count in step.work:
        seq.num_computed += count
        scheduler.blocks.commit(seq)
        seq.tokens.append(0)
    return scheduler.schedule(lambda key, in_use: True)


def test_decode_rows_are_grouped_by_adapter_whatever_their_arrival_order():
    scheduler = Scheduler(max_batch_size=8, max_step_tokens=512, blocks=BlockManager(64, 4))
    arrivals = [_seq(0, "b"), _seq(1, "a"), _seq(2, None), _seq(3, "b"), _seq(4, "a"),
                _seq(5, "a", mix=(("a", 0.5), ("b", 0.5)))]
    step = _decode_step(scheduler, arrivals)
    assert step.decode_rows == 6
    assert [seq.request_id for seq, _ in step.work] == ["r2", "r1", "r4", "r0", "r3", "r5"]  # base, a, b, mixtures
    assert [seq.request_id for seq in scheduler.running] == [f"r{n}" for n in range(6)]  # admission order kept


def test_grouped_rows_of_equal_segments_need_no_gather(tiny_folder):
    """What the grouping buys: the rows of two adapters, four each, in the scheduler's order are their own
    segment layout (each row against its own adapter only, no gather); interleaved, the LoRA step must
    either gather and scatter them or (a decode step this small) run every row against both adapters."""
    from transformers import AutoConfig

    from adapters.lora import LINEAR_MODULES, BaseShape, LoraWeights

    shape = BaseShape.from_config(AutoConfig.from_pretrained(tiny_folder))
    bank = LoraBank(torch.device("cpu"), torch.float32, shape, slots=2, max_rank=8)
    for name in ("a", "b"):
        pairs = {(layer, module): (torch.randn(shape.linear_features[module][0], 8),
                                   torch.randn(8, shape.linear_features[module][1]))
                 for layer in range(shape.num_layers) for module in LINEAR_MODULES}
        bank.add(name, LoraWeights(8, pairs, LINEAR_MODULES, None))
    scheduler = Scheduler(max_batch_size=8, max_step_tokens=512, blocks=BlockManager(64, 4))
    step = _decode_step(scheduler, [_seq(n, "ab"[n % 2]) for n in range(8)])
    grouped = bank.prepare([seq.row_adapter for seq, _ in step.work])
    assert (grouped.segment_rows, grouped.gather, grouped.scatter, grouped.mask) == (4, None, None, None)
    interleaved = bank.prepare([seq.row_adapter for seq in scheduler.running])
    assert interleaved.segment_rows == 0 and interleaved.mask.shape == (8, 2, 1)  # wide: 2x the LoRA FLOPs
