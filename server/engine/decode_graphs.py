"""Decode steps replayed as CUDA graphs: one capture per (batch bucket, key-width bucket, LoRA or not).

Why: a decode step of a 7B model issues thousands of kernel launches (more with mixed adapters) and a
few hundred Python calls into the quantized linears; the host's time to issue them is several times
what the device needs to run them. A CUDA graph records the step's launches once
and replays them with one call.

What a captured step needs is every input in a fixed device buffer, no host reads and no shape that
depends on the data. So a decode-only step of n rows is padded to the batch bucket at or above n
(rows past n: token 0 at position 0, writing zeros into slot 0 of the padding block, which must stay
zero); every row attends over one key width, the longest row's blocks rounded up to a power of two;
LoRA runs on the Triton kernels with the rows' slots in fixed buffers (`lora_kernels.StaticSegments`),
every group launched (zero weights add zeros). The step's integers go to the device in one copy
from a pinned buffer. Prompt chunks, mixtures, LoRA rows on the torch kernels and batches above the
largest bucket run eagerly.

Fit: the shapes are captured at start (`warm_up`), before any request, never while serving (a capture
is a pause of a few eager steps), within a memory budget that start-up takes out of free memory before
the KV cache is sized (`plan_shapes`: every batch bucket at the shortest key widths first, each width in
whole while the estimate fits; the captures stop early if what they really take reaches the budget).
A step of a shape not captured runs eagerly.

Trust: a shape's first replay is compared with the same step run eagerly over the same buffers (the
same padded rows and key width, so the same kernels: only the order of split-K's atomic adds differs),
within a bound of the serving dtype. A mismatch, or a capture that fails, disables that shape alone,
with a warning saying why and a metric (`loraplex_cuda_graph_shapes{state="disabled"}`); the eager
answer serves and every other shape stays on graphs.

Without CUDA the same static step runs eagerly (capture=False): that is how the suite checks buffers,
padding and buckets against the eager path on a CPU. Only the engine thread calls this.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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


def width_buckets(max_width: int) -> list[int]:
    """Key widths (in KV blocks) a decode step is padded to: powers of two, ending at `max_width`."""
    widths, width = [], 1
    while width < max_width:
        widths.append(width)
        width *= 2
    return widths + [max_width]


# bound on a replay's difference from the eager step over the same buffers, relative to the largest logit:
# the two differ only by the order of split-K's fp32 atomic adds, rounded into the serving dtype per layer
REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Dims:
    """What a decode step's memory depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_size: int
    element: int  # bytes per value of the serving dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype, block_size: int) -> "Dims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, block_size,
                   torch.empty((), dtype=dtype).element_size())

    def transient(self, rows: int, width: int) -> int:
        """Bytes a step's forward holds at its peak inside one layer, freed after: the rows' keys gathered
        and made contiguous (K held while V is gathered: 3 copies), scores and their fp32 softmax, the MLP."""
        keys = width * self.block_size
        gathered = rows * keys * self.kv_heads * self.head_dim * self.element
        scores = rows * self.heads * keys * (self.element + 4)
        return 3 * gathered + scores + rows * (3 * self.intermediate + 6 * self.hidden) * self.element

    def persistent(self, rows: int, width: int, lora_size: int) -> int:
        """Bytes a captured shape keeps: its fp32 logits (the graph's output) and its input buffers."""
        return rows * self.vocab * 4 + (5 * rows + rows * width + lora_size) * 8


def plan_shapes(dims: Dims, max_rows: int, max_width: int, lora: bool, lora_size, budget: int
                ) -> tuple[list[tuple[int, int, bool]], int]:
    """(the shapes to capture, their estimated bytes): every row bucket, with and without LoRA (when the
    Triton kernels serve), at key widths from the shortest up, a width only whole and only while the
    estimate (the largest shape's transient, shared by all captures through one memory pool, plus every
    shape's persistent bytes, with a quarter more for what the estimate misses) stays within `budget`.
    `lora_size(rows)`: the LoRA segment buffers of a shape."""
    shapes: list[tuple[int, int, bool]] = []
    persistent, transient, total = 0, 0, 0
    for width in width_buckets(max_width):
        keys = [(rows, width, flag) for rows in row_buckets(max_rows) for flag in ((False, True) if lora else (False,))]
        more = sum(dims.persistent(rows, width, lora_size(rows) if flag else 0) for rows, width, flag in keys)
        peak = max(transient, dims.transient(max_rows, width))
        estimate = (persistent + more + peak) * 5 // 4
        if estimate > budget:
            break
        shapes += keys
        persistent, transient, total = persistent + more, peak, estimate
    return shapes, total


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

    def replay(self) -> torch.Tensor:
        """The step's logits (every row, padding included) from its graph; without CUDA, the same step run
        over the buffers (what the suite checks on a CPU)."""
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits

    def fill_padding(self) -> None:
        """Every row a padding row (token 0 at position 0 of the zero block, writing zeros there): the
        inputs of a warm-up step, which touch no request's cache."""
        self.packed.zero_()

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
    """Which decode steps run as graphs, their shapes, and which shapes are disabled."""

    def __init__(self, runner, max_rows: int, capture: bool, budget: int | None = None):
        """`budget`: bytes the captured shapes may take (start-up takes them out of the KV cache's share);
        None: as planned from what is free now (`auto_budget`). Without `capture` (CPU) no budget applies:
        the static step of any shape is built when first needed and run eagerly."""
        self.runner, self.capture = runner, capture
        self.buckets = row_buckets(max_rows)
        self.max_width = -(-runner.context_window // runner.block_size)
        self.shapes: dict[tuple[int, int, bool], StaticDecode] = {}
        self.failed: dict[tuple[int, int, bool], str] = {}  # disabled shapes, and why
        self.trusted: set[tuple[int, int, bool]] = set()  # shapes whose first replay matched the eager step
        self.replays = 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.dims = Dims.of(runner.config, runner.dtype, runner.block_size)
        lora = runner.lora.kernels == "triton"
        self.budget = budget if budget is not None else (auto_budget(runner.device) if capture else None)
        self.planned: set[tuple[int, int, bool]] | None = None  # None: every shape (no capture)
        self.estimate = 0
        if capture:
            planned, self.estimate = plan_shapes(self.dims, max_rows, self.max_width, lora, self._lora_size,
                                                 self.budget)
            self.planned = set(planned)
        self.captured_bytes = 0
        self.warm_up_seconds = 0.0

    def _lora_size(self, rows: int) -> int:
        from server.engine.lora_kernels import StaticSegments

        return StaticSegments.size(rows, self.runner.lora.slots)

    def stats(self) -> dict[str, float]:
        """Counts for /metrics (a snapshot, any thread)."""
        return {"captured": len(self.shapes) if self.capture else 0, "disabled": len(self.failed),
                "replays": self.replays, "memory_bytes": self.captured_bytes}

    def warm_up(self) -> None:
        """Capture every planned shape now, smallest key widths first, on padding rows; stop when what the
        captures really take reaches the budget. Start-up calls it before serving."""
        if not self.capture:
            return
        start = time.perf_counter()
        torch.cuda.synchronize(self.runner.device)
        before = torch.cuda.memory_reserved(self.runner.device)
        for key in sorted(self.planned, key=lambda k: (k[1], k[0], k[2])):
            if self.captured_bytes >= self.budget:
                log.warning("CUDA graphs: the budget (%.0f MiB) is spent after %d shapes; the rest run eagerly",
                            self.budget / 2**20, len(self.shapes))
                self.planned = set(self.shapes)
                break
            shape = StaticDecode(self.runner, *key)
            shape.fill_padding()
            try:
                with torch.inference_mode():
                    shape.capture(self.pool)
            except Exception as exc:  # noqa: BLE001 - this shape runs eagerly; the others are still tried
                self._disable(key, f"capture failed: {type(exc).__name__}: {exc}")
                continue
            self.shapes[key] = shape
            torch.cuda.empty_cache()  # the warm-up forwards' cached blocks: not the graphs' to keep
            self.captured_bytes = torch.cuda.memory_reserved(self.runner.device) - before
        self.warm_up_seconds = time.perf_counter() - start
        log.info("CUDA graphs: %d decode shapes captured in %.1f s, graph memory %.0f MiB (budget %.0f MiB, "
                 "estimate %.0f MiB), key widths up to %d blocks", len(self.shapes), self.warm_up_seconds,
                 self.captured_bytes / 2**20, self.budget / 2**20, self.estimate / 2**20,
                 max((k[1] for k in self.shapes), default=0))

    def shape_for(self, items) -> tuple[tuple[int, int, bool], object] | None:
        """(shape key, rows by slot) of a step that can be replayed, or None: it runs eagerly."""
        if not items or len(items) > self.buckets[-1]:
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
        key = (rows, width, lora)
        if key in self.failed or (self.planned is not None and key not in self.planned):
            return None
        return key, slot_rows

    def run(self, items) -> torch.Tensor | None:
        """The step's logits from a replay, or None when it must run eagerly."""
        found = self.shape_for(items)
        if found is None:
            return None
        key, slot_rows = found
        shape = self.shapes.get(key)
        if shape is None:
            if self.capture:  # planned but not captured (the budget ran out)
                return None
            shape = self.shapes[key] = StaticDecode(self.runner, *key)
        shape.fill(items, slot_rows)
        n = len(items)
        got = shape.replay()
        self.replays += 1
        if key in self.trusted:
            return got[:n]
        got = got[:n].float().clone()  # the eager run below writes the same buffers
        want = shape.forward()[:n]  # the same step over the same buffers, eagerly (same KV writes again)
        scale = max(1.0, want.float().abs().max().item())
        error = (got - want.float()).abs().max().item() / scale
        tolerance = REPLAY_TOLERANCE.get(self.runner.dtype, 5e-2)
        if not error <= tolerance:  # NaN fails too
            self._disable(key, f"its first replay differs from the eager step by {error:.3g} (bound {tolerance:g})")
            return want
        self.trusted.add(key)
        return want

    def _disable(self, key: tuple[int, int, bool], reason: str) -> None:
        log.warning("CUDA graph of %d rows, %d key blocks, LoRA %s disabled (it runs eagerly; %d other shapes "
                    "stay): %s", key[0], key[1], key[2], len(self.shapes) - (key in self.shapes), reason)
        self.failed[key] = reason
        self.shapes.pop(key, None)


def auto_budget(device: torch.device, share: float | None = None) -> int:
    """Bytes the captured shapes may take when start-up gave none: GRAPH_MEMORY_SHARE of what is free."""
    return int(torch.cuda.mem_get_info(device)[0] * (GRAPH_MEMORY_SHARE if share is None else share))


# of the GPU memory free after the base and the adapter slots: what the captured decode shapes may take,
# before the KV cache is sized (64 rows over 2,048 keys of a 7B need ~4 GiB of transient memory)
GRAPH_MEMORY_SHARE = 0.08
