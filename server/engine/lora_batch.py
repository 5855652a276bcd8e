"""Batched multi-adapter LoRA math: every row of a forward pass may use a different adapter.

Memory is fixed at start: `slots` adapters live in a preallocated **slot pool** (every linear's A and
B at the pool's rank, zero-padded), so loading an adapter is a copy into a free slot and nothing is
allocated per adapter or per combination of adapters. The adapters of the current step are packed
densely into a **step stack** (one position per active adapter, at the highest rank among them); it
is updated in place when the set of active adapters changes, one adapter copied per adapter that
joins or moves, and costs nothing on the many steps where the set stays the same. Its memory is
fixed too (at most `slots` positions): no cache grows with the number of adapter combinations.

A step's LoRA work takes one of two paths (`StepLora`), a fixed handful of ops per layer whatever
the adapter mix, instead of one PEFT pass per adapter. **Wide**, a decode step's: x times every active
adapter's A side by side in one matmul (the stack keeps positions interleaved so that this is one
strided matrix), the hidden columns of the adapters a row does not use multiplied by 0, and one addmm
per linear over the stacked Bs: no gather, scatter or segment padding, at u times the (small) LoRA
FLOPs. **Segmented** (punica/LoRAX's segmented gather MV), a long prefill's over several adapters, or a
step with a mixture row: rows grouped by stack position, each group padded to the same number of rows,
one `torch.bmm` over the stacked As plus one per linear over the stacked Bs, and an `index_add_`
putting the deltas back: only the rows' own adapters' FLOPs, at a few more ops (none when the rows
already sit in equal segments, as the scheduler groups decode rows). Linears that read the same input
(q/k/v, gate/up) share the A matmul either way. Why a stack and not a gather from the pool every step:
on a CPU, copying the active adapters' weights each step would cost as much memory traffic as the LoRA
math itself; a per-row gather (bgmv) far more.

**Mixtures**: a row may carry several (adapter, weight) pairs. It then sits in several segments (a step
with a mixture row takes the gather path), and each of its deltas is scaled by its weight before the
scatter adds them up: Σ wᵢ·Bᵢ(Aᵢx) in the same batched step, no merged copy of any adapter. A weight of
1 multiplies exactly, so a one-adapter mixture is bit-identical to that adapter.

On a GPU the Triton kernels of `lora_kernels` (`KernelStepLora`) replace the step stack and the
segment padding: rows read their adapter from the pool by slot index, so nothing is copied when the
set of adapters changes. The torch path stays the CPU's: faster there, and batch-invariant.

Determinism: BLAS (MKL/oneDNN on CPU) changes kernel, hence summation order, with the shape:
with torch 2.13's MKL a row of x @ A differs when x has 1-3 rows rather than 4 or more (earlier
builds also split at 5-7 and 9-11 rows), or when A is narrower than MIN_A_COLUMNS
columns; zero-padding the reduction of h @ B (rank 8 computed as 16) does not change a bit. We pad
segments to a multiple of MIN_GEMM_ROWS rows, ranks to RANK_ALIGN and every group's A to at least
MIN_A_COLUMNS columns, so a row's result is bit-identical whichever requests share its batch (zero
padding adds exact zeros), including adapters of higher rank that widen the step stack. The two paths
give a single-adapter row the same bits (the wide path's other adapters add exact zeros, and MKL's
result for a row does not change with the number of columns of A or the zero rows of B: checked
on every LoRA shape of the default model, 1-8 adapters, 4-64 rows; tests/test_model_runner.py checks
it on the tiny model), so which path a step takes does not change an answer. This matters
more than it seems: bitsandbytes' CPU kernel rounds its input to bf16, which turns a 1e-7 drift into a
different token now and then.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from adapters.lora import BaseShape, LoraWeights
from server.engine.transfer import to_device

log = logging.getLogger(__name__)

# what a row asks for: nothing (the base), one adapter, or a mixture of (adapter, weight) pairs
RowAdapter = str | tuple[tuple[str, float], ...] | None
RANK_ALIGN = 8
MIN_A_COLUMNS = 16  # see _Layout
MIN_GEMM_ROWS = 4
# On a CPU, a step whose LoRA matmuls cover at most this many rows (a lone stream: one segment of 4
# padded rows) runs them on one thread: splitting a [4, 576] x [576, 48] GEMM over two threads costs
# more in fork/join than it saves, and a step of the default model runs hundreds of them. Larger steps keep
# every thread. MKL gives the same bits on one thread as on two for these shapes (checked when this was
# written: every LoRA shape of the default model, 1-8 segments of 4-64 rows), so invariance holds.
SINGLE_THREAD_ROWS = 4
# A step takes the wide path (StepLora) when it wastes at most this many row-adapter products on rows
# that do not use an adapter (rows x adapters, less what the gather path computes): below it, the
# gather path's extra ops per linear (a gather, a cat, an index_add per module) cost more than the
# wasted FLOPs. A decode step of 16 rows over 3 or 4 experts is wide; a long prefill over several is not.
WIDE_EXTRA_ROWS = 32

# Linears grouped by the input they read; a group shares one A matmul.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
_MODULE_GROUP = {module: (group, index) for group, modules in GROUPS.items() for index, module in enumerate(modules)}


def matmul_rows(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight (a matrix, or a Linear applied to x), computed over a multiple of MIN_GEMM_ROWS rows."""
    apply = weight if callable(weight) else (lambda rows: rows @ weight)
    rows = x.shape[0]
    padded = -(-rows // MIN_GEMM_ROWS) * MIN_GEMM_ROWS
    if padded != rows:
        return apply(torch.cat((x, x.new_zeros(padded - rows, x.shape[1]))))[:rows]
    return apply(x)


def aligned_rank(rank: int) -> int:
    return -(-rank // RANK_ALIGN) * RANK_ALIGN


class _Layout:
    """Where each linear's A and B sit in one adapter's flat block of parameters, at one rank.

    Per (layer, group): A as [in, modules, a_rank] (so the first r ranks of every module can be read
    at once), then per module B as [rank, out]. `a_rank` is the rank, except that a group's A is never
    narrower than MIN_A_COLUMNS (a single-module group at rank 8 gets 16 columns, the last 8 zero): on
    this CPU a row of x @ A has other bits when A is narrower, and the step stack's rank changes with the
    adapters it holds."""

    def __init__(self, shape: BaseShape, rank: int):
        self.rank = rank
        self.a: dict[tuple[int, str], tuple[int, int, int]] = {}  # -> (offset, in, modules)
        self.b: dict[tuple[int, str], tuple[int, int]] = {}  # (layer, module) -> (offset, out)
        offset = 0
        for layer in range(shape.num_layers):
            for group, modules in GROUPS.items():
                in_features = shape.linear_features[modules[0]][0]
                self.a[(layer, group)] = (offset, in_features, len(modules))
                offset += in_features * len(modules) * self.a_rank(len(modules))
                for module in modules:
                    out = shape.linear_features[module][1]
                    self.b[(layer, module)] = (offset, out)
                    offset += rank * out
        self.size = offset

    def a_rank(self, modules: int) -> int:
        """Columns per module of a group's A."""
        return max(self.rank, -(-MIN_A_COLUMNS // modules))

    def a_view(self, flat: torch.Tensor, key: tuple[int, str]) -> torch.Tensor:
        """[..., in, modules, a_rank] view of `flat` ([..., size])."""
        offset, in_features, modules = self.a[key]
        a_rank = self.a_rank(modules)
        return flat[..., offset : offset + in_features * modules * a_rank].unflatten(-1, (in_features, modules, a_rank))

    def b_view(self, flat: torch.Tensor, key: tuple[int, str]) -> torch.Tensor:
        offset, out = self.b[key]
        return flat[..., offset : offset + self.rank * out].unflatten(-1, (self.rank, out))


@dataclass(frozen=True)
class _Resident:
    slot: int
    rank: int  # aligned
    groups: frozenset  # (layer, group) it has weights in
    modules: frozenset  # (layer, module) it has weights in


class _StackLayout:
    """Where the step stack keeps each linear's A and B: position-interleaved, so that the first u
    positions of a group's A are one matrix and every active adapter is one matmul away.

    Per (layer, group): A as [in, capacity, modules, a_rank] (`_Layout.a_rank`): its first u positions,
    [in, u * modules * a_rank], are a strided matrix BLAS reads in place. Per (layer, module): B as
    [capacity, rank, out]: the first u positions stacked, [u * rank, out], are contiguous. The same
    memory also reads as one [u, in, modules * a_rank] / [u, rank, out] batch per position (the gather
    path's bmm)."""

    def __init__(self, shape: BaseShape, rank: int, capacity: int):
        self.rank, self.capacity = rank, capacity
        self.columns = _Layout(shape, rank)  # a_rank per group width; sizes per position
        self.a: dict[tuple[int, str], tuple[int, int, int, int]] = {}  # -> (offset, in, modules, a_rank)
        self.b: dict[tuple[int, str], tuple[int, int]] = {}  # (layer, module) -> (offset, out)
        offset = 0
        for key, (_, in_features, modules) in self.columns.a.items():
            a_rank = self.columns.a_rank(modules)
            self.a[key] = (offset, in_features, modules, a_rank)
            offset += in_features * capacity * modules * a_rank
            for module in GROUPS[key[1]]:
                out = self.columns.b[(key[0], module)][1]
                self.b[(key[0], module)] = (offset, out)
                offset += capacity * rank * out
        self.size = offset  # = capacity * _Layout(shape, rank).size

    def a_full(self, flat: torch.Tensor, key) -> torch.Tensor:
        offset, in_features, modules, a_rank = self.a[key]
        return flat[offset : offset + in_features * self.capacity * modules * a_rank].view(
            in_features, self.capacity, modules, a_rank)

    def b_full(self, flat: torch.Tensor, key) -> torch.Tensor:
        offset, out = self.b[key]
        return flat[offset : offset + self.capacity * self.rank * out].view(self.capacity, self.rank, out)


@dataclass
class _GroupWeights:
    """One group's weights for the step, as views made once per change of the stack's members (not per
    layer call: a decode step makes 120 of them)."""

    a: torch.Tensor  # [in, positions * modules * a_rank]: every position's A for the modules side by side (strided)
    batched_a: torch.Tensor  # the same memory as [positions, in, modules * a_rank]: the segmented path's bmm operand
    positions: int
    a_rank: int  # columns per module of A
    bs: tuple[torch.Tensor | None, ...]  # per module [positions, rank, out]; None when no member targets it
    stacked_bs: tuple[torch.Tensor | None, ...]  # the same, as [positions * rank, out]: the wide path's addmm operand
    by_position: torch.Tensor  # [in, positions, modules, a_rank]: the CPU kernel's operand (cpu_lora.py)


class _StepStack:
    """The step's adapters packed densely, position 0..u-1, at one rank, in fixed memory (`_StackLayout`)."""

    def __init__(self, shape: BaseShape, capacity: int, device: torch.device, dtype: torch.dtype):
        self.shape, self.capacity, self.device, self.dtype = shape, capacity, device, dtype
        self.members: list[str] = []  # position -> adapter
        self.rank = 0
        self.layout: _StackLayout | None = None
        self.flat: torch.Tensor | None = None
        self.groups: dict[tuple[int, str], _GroupWeights] = {}

    def clear(self) -> None:
        self.members = []

    def place(self, names: list[str], residents: dict[str, _Resident], pool: "LoraBank") -> dict[str, int]:
        """Make `names` the members, densely, and return their positions. Members that stay keep their
        position where they can; only adapters that join or move are copied."""
        rank = max(residents[name].rank for name in names)
        if rank != self.rank:
            self._allocate(rank)
            self.members = []
        wanted = set(names)
        if self.members and set(self.members) == wanted:
            return {name: i for i, name in enumerate(self.members)}
        if not self.members:
            order = sorted(names)  # a fresh stack in name order: the engine's grouped rows match it
            moved = order
        else:
            order: list[str | None] = [m if m in wanted else None for m in self.members]
            moved = []
            for name in sorted(wanted - set(self.members)):  # joiners fill holes first
                hole = next((i for i, m in enumerate(order) if m is None), None)
                if hole is None:
                    order.append(name)
                else:
                    order[hole] = name
                moved.append(name)
            while None in order:  # close the remaining holes with the last members
                last = order.pop()
                if last is not None:
                    order[order.index(None)] = last
                    moved.append(last)
        self.members = list(order)
        positions = {name: i for i, name in enumerate(self.members)}
        for name in moved:
            self._copy_in(positions[name], pool.pool[residents[name].slot], pool.layout)
        self._refresh_groups(residents)
        return positions

    def _allocate(self, rank: int) -> None:
        self.rank = rank
        self.layout = _StackLayout(self.shape, rank, self.capacity)
        self.flat = None  # free the old stack before the new one is allocated
        self.flat = torch.empty(self.layout.size, device=self.device, dtype=self.dtype)

    def _copy_in(self, position: int, source: torch.Tensor, source_layout: _Layout) -> None:
        """A slot's parameters (`source`, laid out as `source_layout`, a rank >= the stack's) into `position`:
        a strided copy per group's A and per linear's B (a narrower stack takes the first columns/rows)."""
        layout, rank = self.layout, self.layout.rank
        for key, (_, _, _, a_rank) in layout.a.items():
            layout.a_full(self.flat, key)[:, position].copy_(source_layout.a_view(source, key)[..., :a_rank])
        for key in layout.b:
            layout.b_full(self.flat, key)[position].copy_(source_layout.b_view(source, key)[:rank])

    def _refresh_groups(self, residents: dict[str, _Resident]) -> None:
        """Views for the step: groups and modules no member has weights in are skipped."""
        used_groups = frozenset().union(*(residents[m].groups for m in self.members))
        used_modules = frozenset().union(*(residents[m].modules for m in self.members))
        count, layout = len(self.members), self.layout
        self.groups = {}
        for key in sorted(used_groups):
            a = layout.a_full(self.flat, key)[:, :count]  # [in, u, modules, a_rank]
            bs = tuple(layout.b_full(self.flat, (key[0], module))[:count] if (key[0], module) in used_modules
                       else None for module in GROUPS[key[1]])
            stacked = tuple(None if b is None else b.flatten(0, 1) for b in bs)
            self.groups[key] = _GroupWeights(a.flatten(1), a.flatten(2).transpose(0, 1), count, layout.a[key][3], bs,
                                             stacked, a)


@dataclass
class StepLora:
    """LoRA work plan for one forward pass, on one of two paths that give the same bits (module docstring).

    **Wide** (`mask` set, or a lone adapter): every row against every active adapter, x @ [A₀|A₁|…] in
    one matmul, the hidden columns of the adapters a row does not use multiplied by 0, and per linear
    one addmm over the stacked Bs. No gather, scatter or padding to the longest segment: the fewest ops,
    at u times the LoRA FLOPs, which is what a decode step wants.
    **Segmented** (`segment_rows` set): rows grouped by adapter into padded segments (`gather`), one bmm
    per stage, the deltas (scaled by a mixture row's weights) added back with `index_add_`: the FLOPs of
    the rows' own adapters only, for large prefills over many adapters and steps with a mixture row. When the rows already sit in equal segments in stack order (the
    scheduler groups a step's decode rows by adapter), the batch is its own layout: no gather, no scatter,
    no waste, the cheapest of all."""

    groups: dict[tuple[int, str], _GroupWeights]
    rank: int
    # wide: [rows (padded), u, 1], 1 where a row uses a position's adapter, else 0; None: every row on the
    # one active adapter
    mask: torch.Tensor | None = None
    # segmented (gather or equal segments): m, rows per adapter segment, padded; 0: the wide path
    segment_rows: int = 0
    # gather: [u * m] rows of x (len(x) = an appended zero row); None: x is already u segments of m rows
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None  # [u * m] rows of y (padding adds exact zeros to row 0)
    pads: bool = False  # whether `gather` refers to the appended zero row
    scale: torch.Tensor | None = None  # [u * m, 1]: a gathered row's mixture weight; None: all 1
    # wide: x is padded with this many zero rows to a multiple of MIN_GEMM_ROWS (batch invariance), and
    # the deltas of the real rows added back
    pad_rows: int = 0
    # a CPU step with this little LoRA work runs its matmuls on one thread (see SINGLE_THREAD_ROWS)
    single_thread: bool = False
    # wide, float16: mask != 0; the hidden columns a row does not use are selected away, not multiplied by 0
    # (an overflow to inf there would make NaN: LoraBank.overflow_guard)
    keep: torch.Tensor | None = None
    # the CPU kernel's plan (cpu_lora.py; LoraBank._prepare_rows) and the kernel op
    rows: tuple[torch.Tensor, ...] | None = None
    row_kernel: object | None = None

    def apply(self, layer: int, group: str, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        """Add the LoRA deltas of `group` at `layer` to the base outputs, in place."""
        weights = self.groups.get((layer, group))
        if weights is None:
            return
        if self.rows is not None:
            self.row_kernel(x.contiguous(), weights.by_position, weights.bs, outputs, *self.rows, self.rank)
            return
        run = self._segmented if self.segment_rows else self._wide
        if not self.single_thread:
            run(weights, x, outputs)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run(weights, x, outputs)
        finally:
            torch.set_num_threads(threads)

    def _wide(self, weights: _GroupWeights, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        if self.pad_rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.pad_rows))
        rows = x.shape[0]
        hidden = torch.mm(x, weights.a).view(rows, weights.positions, len(outputs), weights.a_rank)
        for j, (y, b) in enumerate(zip(outputs, weights.stacked_bs)):
            if b is None:
                continue
            h = hidden[:, :, j, : self.rank]
            if self.keep is not None:
                h = torch.where(self.keep, h * self.mask, 0)
            elif self.mask is not None:
                h = h * self.mask  # also makes it contiguous: [rows, u, rank]
            h = h.reshape(rows, -1)  # [rows, u * rank] @ [u * rank, out]
            if self.pad_rows:
                y.add_(torch.mm(h, b)[: y.shape[0]])
            else:
                y.addmm_(h, b)

    def _segmented(self, weights: _GroupWeights, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        segments, rows = weights.positions, self.segment_rows
        if self.gather is not None:
            source = torch.cat((x, x.new_zeros(1, x.shape[1]))) if self.pads else x
            x = source.index_select(0, self.gather)
        hidden = torch.bmm(x.view(segments, rows, -1), weights.batched_a)
        rank, width = self.rank, weights.a_rank
        for j, (y, b) in enumerate(zip(outputs, weights.bs)):
            if b is None:
                continue
            delta = torch.bmm(hidden[:, :, j * width : j * width + rank], b).view(segments * rows, -1)
            if self.scale is not None:
                delta.mul_(self.scale)
            if self.scatter is None:
                y.add_(delta)
            else:
                y.index_add_(0, self.scatter, delta)


@dataclass
class KernelStepLora:
    """LoRA work plan for one forward pass on the Triton kernels: rows sorted by pool slot, no step
    stack. One `Segments` per pass: a row mixing k adapters is in k passes (a pass adds each row's
    delta once, so the kernels need no atomics on the outputs)."""

    bank: "LoraBank"
    passes: list
    groups: frozenset  # (layer, group) some active adapter has weights in
    modules: frozenset  # (layer, module) likewise

    def apply(self, layer: int, group: str, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        if (layer, group) not in self.groups:
            return
        kernels, layout, pool = self.bank.kernels_module, self.bank.layout, self.bank.pool
        offset, _, count = layout.a[(layer, group)]
        a_rank = layout.a_rank(count)  # columns per module of A (the pool's rank but for narrow groups)
        x = x.contiguous()
        for segments in self.passes:
            hidden = torch.empty(segments.entries, count * a_rank, device=x.device, dtype=torch.float32)
            kernels.shrink(x, pool, offset, count * a_rank, a_rank, segments, hidden)
            for j, (module, y) in enumerate(zip(GROUPS[group], outputs)):
                if (layer, module) in self.modules:
                    kernels.expand(hidden, j * a_rank, layout.rank, pool, layout.b[(layer, module)][0], segments, y)


KERNELS = ("auto", "torch", "triton", "cpu")


def choose_kernels(kernels: str, device: torch.device, dtype: torch.dtype, shape: BaseShape | None = None,
                   rank: int = 16):
    """("torch" or "triton", the lora_kernels module or None) for the `lora_kernels` setting: Triton only
    after its self-check, on the problems of a base of `shape` with slots of `rank`, passes on this device;
    "auto" tries it on CUDA only. Start-up calls it before sizing memory (the Triton kernels need no stack)."""
    if kernels not in KERNELS:
        raise ValueError(f"lora_kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if kernels == "torch":
        return "torch", None
    if kernels == "cpu" or (kernels == "auto" and device.type == "cpu"):
        from server.engine import cpu_lora

        problem = cpu_lora.usable(device, dtype, rank)
        if not problem:
            return "cpu", None
        if kernels == "cpu":
            raise ValueError(f"lora_kernels: cpu cannot be used here: {problem}")
        log.warning("LoRA kernels: torch, not the CPU kernel: %s", problem)
        return "torch", None
    if kernels == "auto" and device.type != "cuda":
        return "torch", None
    return triton_or_torch(kernels, device, dtype, shape, rank)


def triton_or_torch(kernels: str, device: torch.device, dtype: torch.dtype, shape: BaseShape | None, rank: int):
    """The Triton kernels if their self-check passes; else "triton" is an error and "auto" falls back to the
    torch kernels with a warning that names the failure (which group, K, split and dtype, and by how much)."""
    try:
        from server.engine import lora_kernels
    except ImportError as exc:  # triton is not installed
        problem = f"Triton is not available ({exc})"
    else:
        problem = lora_kernels.self_check(device, dtype, shape, rank)
    if problem is None:
        return "triton", lora_kernels
    if device.type != "cuda":
        problem += " (without a GPU Triton runs only interpreted: set TRITON_INTERPRET=1 before starting)"
    if kernels == "triton":
        raise ValueError(f"lora_kernels: triton cannot be used here: {problem}")
    log.warning("LoRA kernels: torch, not Triton: %s", problem)
    return "torch", None


class LoraBank:
    """Adapters resident on the compute device, in `slots` preallocated slots. Only the engine thread
    calls it.

    `kernels`: "torch" (the step stack and batched matmuls above: batch-invariant on a CPU), "triton"
    (`lora_kernels`: rows read their adapter straight from the pool; interpreted, hence slow, without
    a GPU, which is how the suite tests it), or "auto": Triton on CUDA when it is installed and its
    self-check passes, torch otherwise."""

    def __init__(self, device: torch.device, dtype: torch.dtype, shape: BaseShape, slots: int = 8,
                 max_rank: int = 64, batch_invariant: bool = True, kernels: str = "torch", grow: bool | None = None):
        """`grow`: slots sized to the highest rank registered, growing (None: on a CPU with the torch kernels)."""
        self.device = device
        self.dtype = dtype
        self.shape = shape
        self.slots = slots
        # the row padding only buys batch invariance from CPU BLAS; on a GPU it is wasted work, and an
        # operator may trade it for speed (batch_invariant: false): a lone row then costs a quarter
        self.min_rows = MIN_GEMM_ROWS if device.type == "cpu" and batch_invariant else 1
        # The wide path multiplies every row by every active adapter and zeroes what a row does not use:
        # a row stays clear of another adapter only while that adapter's weights are finite (refused
        # otherwise in `add`) and x @ A cannot overflow for it (inf * 0 is NaN). Admission bounds weights
        # to 1,000, which float32 and bfloat16 cannot overflow on any base; float16 (max 65,504) can, so
        # there the zeroing is a select, not a multiply.
        self.overflow_guard = dtype == torch.float16
        self.max_rank = aligned_rank(max_rank)
        self.kernels, self.kernels_module = choose_kernels(kernels, device, dtype, shape, self.max_rank)
        # On a CPU (torch kernels) the slots start at the smallest rank and grow to the highest rank registered
        # (`_grow`): a slot is zeroed whole at its first load, so slots sized for max_rank would make every
        # loaded adapter cost the largest adapter's memory (rank 64 slots: 78 MB each on the default model,
        # for rank-8 experts of 10 MB). On a GPU (and with the Triton kernels, compiled for one layout) the
        # whole pool is reserved now at max_rank, so running out of memory happens at start or never.
        self.grows = (device.type == "cpu" and self.kernels != "triton") if grow is None else grow
        self.layout = _Layout(shape, RANK_ALIGN if self.grows else self.max_rank)
        # torch.empty: on a CPU the pages of slots never used are never touched (not resident)
        self.pool = torch.empty(slots, self.layout.size, device=device, dtype=dtype)
        self._free = list(range(slots - 1, -1, -1))
        self._residents: dict[str, _Resident] = {}
        # the CPU kernel reads its stack in bfloat16 (cpu_lora.py): half the bytes of what is memory-bound
        self._stack = _StepStack(shape, slots, device, torch.bfloat16 if self.kernels == "cpu" else dtype)
        # loads through a pinned staging buffer and a side stream (CUDA); direct copies on a CPU
        self.staged_loads = device.type == "cuda"
        self._staging: torch.Tensor | None = None
        self._staging_event = None
        self._copy_stream = None
        self._pending: dict[int, object] = {}  # slot -> CUDA event of its copy still in flight
        # slot -> (rank, (layer, module) pairs) of what is not zero in it; a slot not here was never written
        # (torch.empty: anything) and is zeroed whole, once, at its first load
        self._written: dict[int, tuple[int, frozenset]] = {}
        # bytes of the last load: sent host -> device, and written into the slot (its weights, and zeros where
        # the slot's previous adapter had weights the new one does not overwrite)
        self.last_load: dict[str, int] = {}

    @staticmethod
    def bytes_needed(shape: BaseShape, slots: int, max_rank: int, dtype: torch.dtype, step_stack: bool = True) -> int:
        """The pool, and the step stack at its largest (the torch kernels' only; the Triton kernels read
        the pool): what `slots` adapters of `max_rank` take."""
        element = torch.empty((), dtype=dtype).element_size()
        return (2 if step_stack else 1) * slots * _Layout(shape, aligned_rank(max_rank)).size * element

    @property
    def step_stack_bytes(self) -> int:
        flat = self._stack.flat
        return 0 if flat is None else flat.numel() * flat.element_size()

    def memory(self) -> tuple[int, int]:
        """(bytes of slots holding an adapter, bytes of the whole pool): a snapshot, any thread."""
        slot = self.layout.size * self.pool.element_size()
        return len(self._residents) * slot, self.slots * slot

    def add(self, name: str, weights: LoraWeights) -> None:
        """Load an adapter into a free slot. Only its rank is written: a slot's columns past the rank of the
        adapter in it, and its linears the adapter does not target, stay zero (the kernels read them, scaled
        by nothing), so a load writes the adapter's bytes, not the slot's (a rank-16 adapter in rank-64 slots:
        a quarter), plus zeros where the slot's previous adapter reached further."""
        self.remove(name)
        if not all(bool(torch.isfinite(matrix).all()) for pair in weights.pairs.values() for matrix in pair):
            raise ValueError(f"adapter {name} holds NaN or infinite values")  # see `wide`
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter {name} has rank {weights.rank}; the slots hold rank {self.max_rank} at most")
        if aligned_rank(weights.rank) > self.layout.rank:
            self._grow(aligned_rank(weights.rank))
        if not self._free:
            raise RuntimeError(f"all {self.slots} adapter slots are in use")
        slot = self._free.pop()
        if self.staged_loads:
            written = self._upload(slot, weights)
        else:
            flat = self.pool[slot]
            zeroed = self._clear_for(slot, flat, weights)
            written = self._write(flat, weights)
            numel = sum(a.numel() + b.numel() for a, b in weights.pairs.values())
            self.last_load = {"host_to_device_bytes": 0, "slot_bytes_written": numel * flat.element_size() + zeroed}
        self._written[slot] = (weights.rank, frozenset(weights.pairs))
        groups = frozenset((layer, group) for layer, group, _ in written)
        modules = frozenset((layer, module) for layer, _, module in written)
        self._residents[name] = _Resident(slot, aligned_rank(weights.rank), groups, modules)

    def _grow(self, rank: int) -> None:
        """Re-lay the pool at a higher rank (CPU): each written slot's adapters copied into their new places, the
        rest of those slots zeroed; slots never written stay untouched. Runs on the engine thread between steps;
        the step stack is rebuilt at the next step."""
        old_layout, old_pool = self.layout, self.pool
        layout = _Layout(self.shape, rank)
        pool = torch.empty(self.slots, layout.size, device=self.device, dtype=self.dtype)
        for slot in self._written:
            new, old = pool[slot], old_pool[slot]
            new.zero_()
            for key, (_, _, modules) in old_layout.a.items():
                layout.a_view(new, key)[..., : old_layout.a_rank(modules)].copy_(old_layout.a_view(old, key))
            for key in old_layout.b:
                layout.b_view(new, key)[: old_layout.rank].copy_(old_layout.b_view(old, key))
        self.layout, self.pool = layout, pool
        self._staging = None  # sized for a slot
        self._stack.clear()
        log.info("adapter slots grown to rank %d (%.1f MiB a slot) for a higher-rank adapter", rank,
                 layout.size * pool.element_size() / 2**20)

    def _views(self, flat: torch.Tensor, key: tuple[int, str], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `rank` columns of (layer, module)'s A and rows of its B in a slot's `flat` parameters."""
        layer, module = key
        group, index = _MODULE_GROUP[module]
        return (self.layout.a_view(flat, (layer, group))[:, index, :rank],
                self.layout.b_view(flat, (layer, module))[:rank])

    def _clear_for(self, slot: int, flat: torch.Tensor, weights: LoraWeights) -> int:
        """Zero what `weights` will not overwrite of the slot's previous adapter (all of a never-used slot);
        the bytes zeroed."""
        previous = self._written.get(slot)
        if previous is None:
            flat.zero_()
            return flat.numel() * flat.element_size()
        rank, pairs = previous
        zeroed = 0
        for key in pairs:
            if key in weights.pairs and weights.rank >= rank:
                continue  # overwritten whole
            for view in self._views(flat, key, rank):
                view.zero_()
                zeroed += view.numel() * view.element_size()
        return zeroed

    def _write(self, flat: torch.Tensor, weights: LoraWeights) -> list[tuple[int, str, str]]:
        """Each linear's A and B into `flat` (a slot's layout), the adapter's rank only."""
        written = []
        for key, (a, b) in weights.pairs.items():
            a_view, b_view = self._views(flat, key, weights.rank)
            a_view.copy_(a)
            b_view.copy_(b)
            written.append((key[0], _MODULE_GROUP[key[1]][0], key[1]))
        return written

    def _upload(self, slot: int, weights: LoraWeights) -> list[tuple[int, str, str]]:
        """A GPU load: the adapter's matrices, packed end to end in one pinned host buffer, go to the device
        in one transfer on a side stream, and are laid into their slot there (a strided copy per matrix, the
        adapter's rank only); the step that first uses the slot waits for that copy on the device
        (`_await_loads`), the host never does, and the step running meanwhile is not held up. The staging
        buffer is reused: before it is rewritten, the host waits for its previous transfer."""
        cuda = self.device.type == "cuda"
        if self._staging is None:
            self._staging = torch.empty(self.layout.size, dtype=self.dtype, pin_memory=cuda)
        if self._staging_event is not None:
            self._staging_event.synchronize()
        packed, offset = [], 0
        for a, b in weights.pairs.values():
            for matrix in (a, b):
                view = self._staging[offset : offset + matrix.numel()].view(matrix.shape)
                view.copy_(matrix)
                packed.append(view)
                offset += matrix.numel()
        on_side_stream = contextlib.nullcontext()
        if cuda:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            # a freed slot may still be read by a step queued on the compute stream: the copy waits for it
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            on_side_stream = torch.cuda.stream(self._copy_stream)
        with on_side_stream:
            flat = self.pool[slot]
            zeroed = self._clear_for(slot, flat, weights)
            # allocated on the copy stream, used only there: its memory is reused once this stream's work is done
            sent = self._staging[:offset].to(self.device, non_blocking=True)
            written, start = [], 0
            for key in weights.pairs:
                for view in self._views(flat, key, weights.rank):
                    view.copy_(sent[start : start + view.numel()].view(view.shape))
                    start += view.numel()
                written.append((key[0], _MODULE_GROUP[key[1]][0], key[1]))
            if cuda:
                event = torch.cuda.Event()
                event.record(self._copy_stream)
                self._pending[slot] = event
                self._staging_event = event
        element = self.pool.element_size()
        self.last_load = {"host_to_device_bytes": offset * element, "slot_bytes_written": offset * element + zeroed}
        return written

    def _await_loads(self, slots) -> None:
        """Make the compute stream wait (on the device) for the copies of `slots` still in flight."""
        for slot in slots:
            event = self._pending.pop(slot, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    def remove(self, name: str) -> None:
        resident = self._residents.pop(name, None)
        if resident is not None:
            self._pending.pop(resident.slot, None)  # the next copy into the slot waits for the compute stream
            self._free.append(resident.slot)
            if name in self._stack.members:
                self._stack.clear()  # its stack copy must never serve again: rebuilt at the next step

    def prepare(self, row_adapters: list[RowAdapter]) -> StepLora | KernelStepLora | None:
        """Plan the step's LoRA work; None when no row uses an adapter (zero LoRA cost)."""
        members: list[tuple[int, str, float]] = []  # (row, adapter, weight)
        for row, entry in enumerate(row_adapters):
            if entry is None:
                continue
            if isinstance(entry, str):
                members.append((row, entry, 1.0))
            else:
                members.extend((row, name, float(weight)) for name, weight in entry)
        if not members:
            return None
        if self._pending:
            self._await_loads({self._residents[name].slot for _, name, _ in members})
        if self.kernels == "triton":
            return self._prepare_kernels(row_adapters)
        names = sorted({name for _, name, _ in members})
        positions = self._stack.place(names, self._residents, self)
        if self.kernels == "cpu":
            return self._prepare_rows(row_adapters, positions)
        order = sorted(names, key=positions.__getitem__)
        rows_of: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
        for row, name, weight in members:
            rows_of[name].append((row, weight))
        longest = max(len(rows) for rows in rows_of.values())
        segment_rows = -(-longest // self.min_rows) * self.min_rows
        padded = -(-len(row_adapters) // self.min_rows) * self.min_rows
        stack, count = self._stack, len(order)
        mixed = any(weight != 1.0 for _, _, weight in members)
        cpu = self.device.type == "cpu"
        if not mixed and count > 1 and row_adapters == [name for name in order for _ in range(segment_rows)]:
            return StepLora(stack.groups, stack.rank, segment_rows=segment_rows,
                            single_thread=cpu and count * segment_rows <= SINGLE_THREAD_ROWS)
        # A step with a mixture row gathers: there each of the row's adapters has its own delta, added in
        # stack order; on the wide path they would be summed inside one GEMM whose blocking changes with
        # the number of adapters in the step, so the row's bits would depend on who shares its batch.
        if not mixed and (padded - segment_rows) * count <= WIDE_EXTRA_ROWS:
            single = cpu and padded * count <= SINGLE_THREAD_ROWS
            lone = count == 1 and all(entry == order[0] for entry in row_adapters)
            if lone:
                return StepLora(stack.groups, stack.rank, pad_rows=padded - len(row_adapters), single_thread=single)
            mask = [0.0] * (padded * count)
            for row, name, _ in members:
                mask[row * count + positions[name]] = 1.0
            weights = to_device(mask, self.device, self.dtype).view(padded, count, 1)
            return StepLora(stack.groups, stack.rank, weights, pad_rows=padded - len(row_adapters),
                            single_thread=single, keep=weights != 0 if self.overflow_guard else None)
        zero_row = len(row_adapters)
        gather, scatter, scale = [], [], []
        for name in order:
            pad = segment_rows - len(rows_of[name])
            gather += [row for row, _ in rows_of[name]] + [zero_row] * pad
            scatter += [row for row, _ in rows_of[name]] + [0] * pad
            scale += [weight for _, weight in rows_of[name]] + [0.0] * pad
        gather_tensor, scatter_tensor = to_device([gather, scatter], self.device).unbind()
        return StepLora(stack.groups, stack.rank, gather=gather_tensor, scatter=scatter_tensor,
                        segment_rows=segment_rows, pads=zero_row in gather,
                        single_thread=cpu and count * segment_rows <= SINGLE_THREAD_ROWS,
                        scale=to_device(scale, self.device, self.dtype)[:, None] if mixed else None)

    def _prepare_rows(self, row_adapters: list[RowAdapter], positions: dict[str, int]) -> StepLora:
        """The CPU kernel's plan (cpu_lora.py): rows on one adapter in items of up to ITEM_ROWS on one stack
        position; mixture rows apart, each with its (position, weight) pairs in its own order."""
        from server.engine import cpu_lora

        by_position: dict[int, list[tuple[int, float]]] = {}
        mixture_rows, starts, mixture_positions, mixture_weights = [], [0], [], []
        for row, entry in enumerate(row_adapters):
            pairs = () if entry is None else ((entry, 1.0),) if isinstance(entry, str) else entry
            if len(pairs) == 1:
                by_position.setdefault(positions[pairs[0][0]], []).append((row, float(pairs[0][1])))
            elif pairs:
                mixture_rows.append(row)
                for name, weight in pairs:
                    mixture_positions.append(positions[name])
                    mixture_weights.append(float(weight))
                starts.append(len(mixture_positions))
        items, item_weights = [], []
        size = cpu_lora.ITEM_ROWS
        for position, rows in sorted(by_position.items()):
            for first in range(0, len(rows), size):
                chunk = rows[first : first + size]
                items.append([position] + [row for row, _ in chunk] + [-1] * (size - len(chunk)))
                item_weights.append([weight for _, weight in chunk] + [0.0] * (size - len(chunk)))
        long, single = torch.int64, torch.float32  # explicit: an empty list would otherwise be float
        plan = (to_device(items, self.device, long).view(-1, size + 1),
                to_device(item_weights, self.device, single).view(-1, size),
                to_device(mixture_rows, self.device, long), to_device(starts, self.device, long),
                to_device(mixture_positions, self.device, long), to_device(mixture_weights, self.device, single))
        return StepLora(self._stack.groups, self._stack.rank, rows=plan, row_kernel=cpu_lora.load()[0])

    def slot_rows(self, row_adapters: list[RowAdapter]):
        """(rows by pool slot, each slot's rank) for a captured step (`decode_graphs`), every row on one
        adapter or none; None when a row mixes adapters (mixtures run eagerly)."""
        if any(entry is not None and not isinstance(entry, str) for entry in row_adapters):
            return None
        passes, ranks = self._kernel_passes(row_adapters)
        return (passes[0] if passes else {}), ranks

    def static_step(self, segments) -> KernelStepLora:
        """The LoRA plan of a captured step: every group and linear is launched (which adapters it will
        serve is only known at replay; zero weights add zeros)."""
        return KernelStepLora(self, [segments], frozenset(self.layout.a), frozenset(self.layout.b))

    def _kernel_passes(self, row_adapters: list[RowAdapter]):
        """The rows as the Triton kernels take them: one {slot: [(row, weight)]} per pass (a row mixing k
        adapters is in k passes), each active slot's rank; the compute stream waits for their loads."""
        passes: list[dict[int, list[tuple[int, float]]]] = []
        ranks: dict[int, int] = {}
        for row, entry in enumerate(row_adapters):
            if entry is None:
                continue
            pairs = ((entry, 1.0),) if isinstance(entry, str) else entry
            for index, (name, weight) in enumerate(pairs):
                if index == len(passes):
                    passes.append({})
                resident = self._residents[name]
                passes[index].setdefault(resident.slot, []).append((row, float(weight)))
                ranks[resident.slot] = resident.rank
        if self._pending:
            self._await_loads(ranks)
        return passes, ranks

    def _prepare_kernels(self, row_adapters: list[RowAdapter]) -> KernelStepLora:
        passes, ranks = self._kernel_passes(row_adapters)
        residents = [r for r in self._residents.values() if r.slot in ranks]
        kernels = self.kernels_module
        return KernelStepLora(self, [kernels.Segments(rows, ranks, self.device) for rows in passes],
                              frozenset().union(*(r.groups for r in residents)),
                              frozenset().union(*(r.modules for r in residents)))
