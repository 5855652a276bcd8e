"""Decode steps replayed as CUDA graphs: one capture per (batch bucket, key-width bucket, LoRA or not).

Why: a decode step of a 7B model issues ~1,700 kernel launches (~2,400 with mixed adapters) and a
few hundred Python calls into the quantized linears; at 8-12 us of host time per launch the host
needs 15-30 ms per step while the device needs a few. A CUDA graph records the step's launches once
and replays them with one call.

What a captured step needs is every input in a fixed device buffer, no host reads and no shape that
depends on the data. So a decode-only step of n rows is padded to the batch bucket at or above n
(rows past n: token 0 at position 0, writing zeros into slot 0 of the padding block, which must stay
zero); every row attends over one key width, the longest row's blocks rounded up to a power of two;
LoRA runs on the Triton kernels with the rows' slots in fixed buffers (`lora_kernels.StaticSegments`),
every group launched (zero weights add zeros). The step's integers go to the device in one copy
from a pinned buffer. Prompt chunks, mixtures, LoRA rows on the torch kernels and batches above the
largest bucket run eagerly.

Trust: a shape is captured the first time it is needed (a one-off pause of a few eager steps), and
that first replay is compared with the eager step on the same inputs; a mismatch or a failed capture
turns graphs off for the process with a warning saying why, and the eager step answers.

Without CUDA the same static step runs eagerly (capture=False): that is how the suite checks buffers,
padding and buckets against the eager path on a CPU. Only the engine thread calls this.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 64, then powers of two, ending at `max_rows`: a step
    of n rows computes at most ~1.3x n rows beyond 8 (vLLM captures a similar ladder)."""
    buckets, rows = [], 1
    while rows < max_rows:
        buckets.append(rows)
        rows = rows * 2 if rows < 8 or rows >= 64 else rows + 8
    return buckets + [max_rows]


class StaticDecode:
    """The fixed buffers of one shape, the forward over them, and (CUDA) its captured graph."""

    def __init__(self, runner, rows: int, width: int, lora: bool):
        self.runner, self.rows, self.width = runner, rows, width
        self.capacity = runner.lora.slots
        lora_size = 0
        if lora:
            from server.engine.lora_kernels import StaticSegments

            lora_size = StaticSegments.size(rows, self.capacity)
        sizes = (rows, rows, rows, rows, rows * width, lora_size)  # tokens, positions, slots, valid, blocks, LoRA
        cuda = runner.device.type == "cuda"
        self.packed = torch.zeros(sum(sizes), dtype=torch.int64, device=runner.device)
        self.host = torch.zeros(sum(sizes), dtype=torch.int64, pin_memory=cuda)
        self.tokens, self.positions, self.slots, self.valid, table, lora_part = self.packed.split(sizes)
        self.block_table = table.view(rows, width)
        self.step_lora = None
        if lora:
            capacity = self.capacity
            parts = lora_part.split((rows, capacity + 1, capacity, capacity))
            self.step_lora = runner.lora.static_step(StaticSegments(*parts))
        self.graph = None
        self.logits: torch.Tensor | None = None

    def fill(self, items, slot_rows) -> None:
        """The step's inputs into the buffers: one host -> device copy."""
        n, size, width = len(items), self.runner.block_size, self.width
        pad = self.rows - n
        values = [item.token_ids[0] for item in items] + [0] * pad
        values += [item.start for item in items] + [0] * pad
        values += [item.block_table[item.start // size] * size + item.start % size for item in items] + [0] * pad
        values += [1] * n + [0] * pad
        for item in items:
            values += (item.block_table + [0] * width)[:width]
        values += [0] * (pad * width)
        if self.step_lora is not None:
            from server.engine.lora_kernels import StaticSegments

            values += StaticSegments.layout(*slot_rows, self.rows, self.capacity)
        # the pinned buffer is rewritten only after the previous step's results were read on the host,
        # so its previous copy has finished
        self.host.copy_(torch.tensor(values, dtype=torch.int64))
        self.packed.copy_(self.host, non_blocking=True)

    def forward(self) -> torch.Tensor:
        return self.runner.static_decode(self)

    def capture(self, pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles, libraries allocate
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (none are expected) do not invalidate the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self.forward()
        self.graph = graph


class DecodeGraphs:
    """Which decode steps run as graphs, their shapes, and whether graphs are still trusted."""

    def __init__(self, runner, max_rows: int, capture: bool):
        self.runner, self.capture = runner, capture
        self.buckets = row_buckets(max_rows)
        self.max_width = -(-runner.context_window // runner.block_size)
        self.shapes: dict[tuple[int, int, bool], StaticDecode] = {}
        self.disabled: str | None = None
        self.replays = 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def shape_for(self, items) -> tuple[tuple[int, int, bool], object] | None:
        """(shape key, rows by slot) of a step that can be replayed, or None: it runs eagerly."""
        if self.disabled or not items or len(items) > self.buckets[-1]:
            return None
        if any(len(item.token_ids) != 1 or not item.wants_logits for item in items):
            return None
        adapters = [item.adapter for item in items]
        slot_rows = None
        lora = any(adapter is not None for adapter in adapters)
        if lora:
            if self.runner.lora.kernels != "triton":
                return None
            slot_rows = self.runner.lora.slot_rows(adapters)
            if slot_rows is None:  # a mixture
                return None
        rows = next(bucket for bucket in self.buckets if bucket >= len(items))
        needed = max(item.start // self.runner.block_size + 1 for item in items)
        width = min(1 << (needed - 1).bit_length(), self.max_width)
        return (rows, width, lora), slot_rows

    def run(self, items) -> torch.Tensor | None:
        """The step's logits from a replay, or None when it must run eagerly."""
        found = self.shape_for(items)
        if found is None:
            return None
        key, slot_rows = found
        shape = self.shapes.get(key)
        first = shape is None
        if first:
            shape = self.shapes[key] = StaticDecode(self.runner, *key)
        shape.fill(items, slot_rows)
        n = len(items)
        if not self.capture:
            return shape.forward()[:n]
        if not first:
            shape.graph.replay()
            self.replays += 1
            return shape.logits[:n]
        try:
            shape.capture(self.pool)
            shape.graph.replay()
            got = shape.logits[:n].float()
        except Exception as exc:  # noqa: BLE001 - any failure: graphs off, the eager step serves
            self._disable(f"capturing a decode step of {key[0]} rows failed: {type(exc).__name__}: {exc}")
            return None
        want = self.runner.eager_step(items)  # the same KV writes again, and the reference
        error = (got - want.float()).abs().max().item() / max(1.0, want.float().abs().max().item())
        tolerance = 1e-4 if want.dtype == torch.float32 else 2e-2
        if not error <= tolerance:
            self._disable(f"a replayed decode step of {key[0]} rows differs from the eager one by {error:.3g}")
            return want
        log.info("CUDA graph captured: %d rows, %d key blocks, LoRA %s (%d shapes)", key[0], key[1], key[2],
                 len(self.shapes))
        return shape.logits[:n]

    def _disable(self, reason: str) -> None:
        log.warning("CUDA graphs off: %s", reason)
        self.disabled = reason
        self.shapes.clear()
