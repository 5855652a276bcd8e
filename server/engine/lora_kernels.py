"""Triton shrink/expand kernels: every row's LoRA read straight from the slot pool by its slot index.

The torch path (`lora_batch.StepLora`) packs the step's adapters into a dense step stack and runs
batched matmuls over padded segments: on a CPU that is the fastest and batch-invariant way. On a GPU
it costs a stack copy whenever the set of adapters changes, and a gather, a pad and a scatter per
layer. These kernels (the segmented gather matmul of Punica/S-LoRA, as vLLM's `lora_shrink` /
`lora_expand`) take the rows sorted by slot and read each segment's A and B where they sit in the
pool: no stack, no per-set copies, no padding, one launch per linear group (shrink) and one per
linear (expand) whatever the mix of adapters. Their launch sizes depend only on the number of rows
and segments, and all per-row data is in device tensors, so they are fit for CUDA graph capture.

- `shrink`: hidden[e, :] = x[row(e)] @ A[slot(e)] for one group (q/k/v, gate/up share one A of
  `modules * rank` columns), rows of a segment in blocks of BLOCK_M, K split over SPLIT_K programs
  (fp32 atomics) so that a decode step with few rows still fills the GPU.
- `expand`: y[row(e)] += scale(e) * hidden[e, module's columns] @ B[slot(e)], read-add-write: a row
  may appear once per launch (a mixture runs one pass per adapter it mixes, `lora_batch` plans that).

Without a GPU, Triton runs only interpreted (numpy, slow), which is how the suite checks the kernels
against the torch path on CPU: TRITON_INTERPRET=1 must be set before Triton is first imported (torch
itself imports it early; tests/conftest.py sets it). Only the engine thread calls into it.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from server.engine.transfer import to_device

BLOCK_M = 16  # rows of one segment per program (tl.dot needs >= 16 on a GPU)
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _segment_block(order_ptr, seg_start_ptr, seg_slot_ptr, segment, block, BLOCK_M: tl.constexpr):
    """A program's block of one segment: whether it holds any entry (`live`; past the segment's end the
    program has nothing to do), the segment's pool slot, the block's entries, which of them are real, and
    their rows of x / y."""
    start = tl.load(seg_start_ptr + segment)
    end = tl.load(seg_start_ptr + segment + 1)
    first = start + block * BLOCK_M
    entries = first + tl.arange(0, BLOCK_M)
    entry_mask = entries < end
    rows = tl.load(order_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
    return first < end, tl.load(seg_slot_ptr + segment).to(tl.int64), entries, entry_mask, rows


@triton.jit
def _shrink_kernel(x_ptr, x_stride, pool_ptr, slot_stride, a_offset, order_ptr, seg_start_ptr, seg_slot_ptr,
                   seg_rank_ptr, out_ptr, out_stride, K, W, R,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    block, segment, program_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    split, n_block = program_n % SPLIT_K, program_n // SPLIT_K
    live, slot, entries, entry_mask, rows = _segment_block(order_ptr, seg_start_ptr, seg_slot_ptr, segment, block,
                                                           BLOCK_M)
    if live:
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        # each module's A is R (the pool's rank) columns wide; past the segment's own rank they are zero
        col_mask = (cols < W) & (cols % R < tl.load(seg_rank_ptr + segment))
        a_base = pool_ptr + slot * slot_stride + a_offset
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=entry_mask[:, None] & k_mask[None, :],
                        other=0.0)
            a = tl.load(a_base + ks[:, None] * W + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc += tl.dot(x, a)
        out = out_ptr + entries[:, None] * out_stride + cols[None, :]
        mask = entry_mask[:, None] & col_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(h_ptr, h_stride, h_col, pool_ptr, slot_stride, b_offset, order_ptr, seg_start_ptr, seg_slot_ptr,
                   seg_rank_ptr, scale_ptr, y_ptr, y_stride, R, N,
                   HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    block, segment, n_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    live, slot, entries, entry_mask, rows = _segment_block(order_ptr, seg_start_ptr, seg_slot_ptr, segment, block,
                                                           BLOCK_M)
    if live:
        ranks = tl.arange(0, BLOCK_R)
        rank_mask = ranks < tl.minimum(R, tl.load(seg_rank_ptr + segment))  # the rest of B is zero: not read
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        b_base = pool_ptr + slot * slot_stride + b_offset
        b = tl.load(b_base + ranks[:, None] * N + cols[None, :], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        h = tl.load(h_ptr + entries[:, None] * h_stride + h_col + ranks[None, :],
                    mask=entry_mask[:, None] & rank_mask[None, :], other=0.0)
        delta = tl.dot(h.to(b.dtype), b)
        if HAS_SCALE:
            delta = delta * tl.load(scale_ptr + entries, mask=entry_mask, other=0.0)[:, None]
        mask = entry_mask[:, None] & col_mask[None, :]
        y = y_ptr + rows[:, None] * y_stride + cols[None, :]
        current = tl.load(y, mask=mask, other=0.0)
        tl.store(y, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


def _segment_lists(rows_by_slot: dict[int, list[tuple[int, float]]], ranks: dict[int, int]):
    """(order, starts, slots, slot ranks, scale) as host lists: entries sorted by slot, segment bounds."""
    order, starts, slots, scale = [], [0], [], []
    for slot, members in rows_by_slot.items():
        order += [row for row, _ in members]
        scale += [weight for _, weight in members]
        starts.append(len(order))
        slots.append(slot)
    return order, starts, slots, [ranks[slot] for slot in slots], scale


class Segments:
    """One pass of the step's LoRA rows, sorted by slot, as device tensors: `order` (entry -> row of x),
    `starts` (segment -> first entry, plus the end), `slots` (segment -> pool slot), `ranks` (segment ->
    the adapter's rank: columns past it are zero and not computed), `scale` (entry -> mixture weight, or
    None when all are 1); `longest` rows in a segment, for the launch grid."""

    def __init__(self, rows_by_slot: dict[int, list[tuple[int, float]]], ranks: dict[int, int], device: torch.device):
        order, starts, slots, slot_ranks, scale = _segment_lists(rows_by_slot, ranks)
        # one host->device copy for all of it, queued (transfer.to_device)
        packed = to_device(order + starts + slots + slot_ranks, device, torch.int32)
        sizes = (len(order), len(starts), len(slots), len(slots))
        self.order, self.starts, self.slots, self.ranks = packed.split(sizes)
        self.entries = len(order)
        self.segments = len(slots)
        self.longest = max(len(members) for members in rows_by_slot.values())
        mixed = any(weight != 1.0 for weight in scale)
        self.scale = to_device(scale, device, torch.float32) if mixed else None


class StaticSegments(Segments):
    """Segments in fixed device buffers, for a captured CUDA graph: `rows` entries and `capacity`
    segments whatever the step holds. `layout` writes a step's rows into a host list that the caller
    copies into the buffers (with the rest of the step's inputs, in one transfer); segments past the
    step's are empty (start == end) and entries past its rows are never read. No mixture weights."""

    def __init__(self, order: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor):
        self.order, self.starts, self.slots, self.ranks = order, starts, slots, ranks
        self.entries = self.longest = len(order)
        self.segments = len(slots)
        self.scale = None

    @staticmethod
    def layout(rows_by_slot: dict[int, list[tuple[int, float]]], ranks: dict[int, int], rows: int,
               capacity: int) -> list[int]:
        """order (rows) + starts (capacity + 1) + slots (capacity) + ranks (capacity), as one list."""
        order, starts, slots, slot_ranks, _ = _segment_lists(rows_by_slot, ranks)
        pad = capacity - len(slots)
        return (order + [0] * (rows - len(order)) + starts + [len(order)] * pad + slots + [0] * pad
                + slot_ranks + [0] * pad)

    @staticmethod
    def size(rows: int, capacity: int) -> int:
        return rows + 3 * capacity + 1


def choose_split_k(k: int, device: torch.device) -> int:
    """Programs sharing one row block's K on a GPU: few rows leave most of it idle, so a long K (4,096 and
    11,008 on a 7B: 4 and 8) is split, the parts added atomically. One where Triton is interpreted."""
    return max(1, min(8, k // 1024)) if device.type == "cuda" else 1


def shrink(x: torch.Tensor, pool: torch.Tensor, a_offset: int, width: int, rank: int, segments: Segments,
           out: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """out[e, :width] = x[order[e]] @ A (A: [x.shape[1], width] at `a_offset` of each segment's slot, its
    modules side by side at `rank` columns each). `out` is float32 (split K adds partial sums atomically)."""
    k = x.shape[1]
    if split_k is None:
        split_k = choose_split_k(k, x.device)
    if split_k > 1:
        out.zero_()
    grid = (triton.cdiv(segments.longest, BLOCK_M), segments.segments, triton.cdiv(width, BLOCK_N) * split_k)
    _shrink_kernel[grid](x, x.stride(0), pool, pool.stride(0), a_offset, segments.order, segments.starts,
                         segments.slots, segments.ranks, out, out.stride(0), k, width, rank,
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split_k)
    return out


def expand(hidden: torch.Tensor, column: int, rank: int, pool: torch.Tensor, b_offset: int, segments: Segments,
           y: torch.Tensor) -> None:
    """y[order[e]] += scale[e] * hidden[e, column:column + rank] @ B (B: [rank, y.shape[1]] at `b_offset`)."""
    n = y.shape[1]
    grid = (triton.cdiv(segments.longest, BLOCK_M), segments.segments, triton.cdiv(n, BLOCK_N))
    scale = segments.scale if segments.scale is not None else hidden  # unread when HAS_SCALE is false
    _expand_kernel[grid](hidden, hidden.stride(0), column, pool, pool.stride(0), b_offset, segments.order,
                         segments.starts, segments.slots, segments.ranks, scale, y, y.stride(0), rank, n,
                         HAS_SCALE=segments.scale is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         BLOCK_R=max(16, triton.next_power_of_2(rank)))


# the serving dtype's bound on the LoRA delta's error, relative to its largest value: the kernels sum in fp32
# and round the shrink's result to the weights' dtype before the expand (8 bits of mantissa in bf16)
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _check_problems(shape) -> list[tuple[str, int, int, int]]:
    """(group, K, modules, N) of each linear group of `shape` (an adapters.lora.BaseShape), as the runner
    launches them: K is what the shrink reduces over, N the width the expand writes (the group's last module)."""
    groups = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
              "down": ("down_proj",)}
    features = shape.linear_features
    return [(group, features[modules[0]][0], len(modules), features[modules[-1]][1])
            for group, modules in groups.items()]


def self_check(device: torch.device, dtype: torch.dtype, shape=None, rank: int = 16,
               split_k: int | None = None) -> str | None:
    """Run both kernels on the problems the model will give them, against plain torch in fp32; None when they
    agree, else which problem went wrong and how. The engine runs this before trusting the kernels with
    requests: they are compiled for the device at first use, and a Triton, driver or kernel bug shows up here,
    not mid-request.

    What runs, in the serving `dtype`: every linear group of `shape` (the base's BaseShape; a small stand-in
    when None) at its own K (4,096 and 11,008 on a 7B) and output width, with the split of K the serving path
    takes there (`choose_split_k`: 4 or 8 on a GPU, atomics), one segment longer than a block of rows, one
    adapter below the pool's rank and rows with no adapter between; then mixture weights (scaled deltas) and
    the fixed-size segments of a captured step (`StaticSegments`, empty segments after the step's) on the
    first group. `split_k` overrides the split (the suite runs 1/4/8 under the interpreter)."""
    if shape is None:
        problems = [("qkv", 256, 3, 96)]
    else:
        problems = _check_problems(shape)
    generator = torch.Generator().manual_seed(0)
    rows = 40
    ranks = {2: rank, 0: max(1, rank // 2)}  # slot 0: an adapter of half the pool's rank
    # 20 rows (two blocks) on slot 2, 10 on slot 0, 10 with no adapter, interleaved
    members = {2: [(r, 1.0) for r in range(0, rows, 2)], 0: [(r, 1.0) for r in range(1, rows, 4)]}
    mixed = {slot: [(r, (-0.5, 0.75, 1.5)[r % 3]) for r, _ in entries] for slot, entries in members.items()}
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 3e-2)
    passes = [(group, k, modules, n, "plain") for group, k, modules, n in problems]
    passes += [(*problems[0], "mixture weights"), (*problems[0], "static segments")]
    from server.engine.lora_batch import MIN_A_COLUMNS

    for group, k, modules, n, kind in passes:
        a_rank = max(rank, -(-MIN_A_COLUMNS // modules))  # a module's A columns, as the slot layout has them
        width = modules * a_rank
        a_size = k * width
        pool = torch.randn(3, a_size + rank * n, generator=generator)
        pool[:, :a_size] /= k**0.5
        pool[:, a_size:] /= rank**0.5
        for slot, slot_rank in ranks.items():  # past an adapter's rank its slot is zero, as LoraBank writes it
            pool[slot, :a_size].view(k, modules, a_rank)[:, :, slot_rank:] = 0
            pool[slot, a_size:].view(rank, n)[slot_rank:] = 0
        pool = pool.to(device, dtype)
        x = torch.randn(rows, k, generator=generator).to(device, dtype)
        y = torch.randn(rows, n, generator=generator).to(device, dtype)
        entries = mixed if kind == "mixture weights" else members
        split = split_k if split_k is not None else choose_split_k(k, device)
        where = f"{group} (K {k}, N {n}, split-K {split}, {kind}, {dtype})"
        try:
            if kind == "static segments":
                capacity = 4
                layout = StaticSegments.layout(entries, ranks, rows, capacity)
                buffers = torch.tensor(layout, dtype=torch.int64, device=device)
                segments = StaticSegments(*buffers.split((rows, capacity + 1, capacity, capacity)))
            else:
                segments = Segments(entries, ranks, device)
            hidden = shrink(x, pool, 0, width, a_rank, segments,
                            torch.empty(segments.entries, width, device=device), split_k=split)
            got = y.clone()
            column = (modules - 1) * a_rank  # the group's last module
            expand(hidden, column, rank, pool, a_size, segments, got)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            want = torch.zeros(rows, n)
            cpu_pool = pool.float().cpu()
            for slot, slot_entries in entries.items():
                a = cpu_pool[slot, :a_size].view(k, width)[:, column : column + rank]
                b = cpu_pool[slot, a_size:].view(rank, n)
                for row, weight in slot_entries:
                    want[row] += weight * ((x[row].float().cpu() @ a) @ b)
            delta = got.float().cpu() - y.float().cpu()
            error = (delta - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels
            return f"{where}: {type(exc).__name__}: {exc}"
        if not error <= tolerance:  # NaN fails too
            return f"LoRA kernels differ from torch by {error:.3g} (bound {tolerance:g}) in {where}"
    return None
