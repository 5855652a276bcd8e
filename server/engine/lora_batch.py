"""Batched multi-adapter LoRA math: every row of a forward pass may use a different adapter.

Per step, rows are grouped by adapter (a gather), each group is padded to the same number
of rows, and one `torch.bmm` over the stacked A matrices of the active adapters plus one per
module over the stacked B matrices compute every row's delta with no wasted FLOPs; an
`index_add_` puts the deltas back on their rows (when the engine has already grouped the
rows, the batch is its own layout and both are skipped). The stacks are built once per set of active
adapters and cached. Linears that read the same input (q/k/v, gate/up) share the gather and
the A matmul. So a step costs a fixed handful of ops per layer whatever the adapter mix,
instead of one PEFT pass per adapter (this is what punica/LoRAX call segmented gather MV).

Determinism: BLAS (MKL/oneDNN on CPU) changes kernel, hence summation order, with the shape:
on this CPU a row of x @ A differs when x has 1-3, 5-7 or 9-11 rows, or when A is narrower
than RANK_ALIGN columns. We pad segments to a multiple of MIN_GEMM_ROWS rows and ranks to
RANK_ALIGN, so a row's result is bit-identical whichever requests share its batch (zero
padding adds exact zeros). This matters more than it seems: bitsandbytes' CPU kernel rounds its input to
bf16, which turns a 1e-7 drift into a different token now and then.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.lora import LoraWeights

_CONCAT_CACHE_SIZE = 16
RANK_ALIGN = 16
MIN_GEMM_ROWS = 4

# Linears grouped by the input they read; a group shares one A matmul.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def matmul_rows(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight (a matrix, or a Linear applied to x), computed over a multiple of MIN_GEMM_ROWS rows."""
    apply = weight if callable(weight) else (lambda rows: rows @ weight)
    rows = x.shape[0]
    padded = -(-rows // MIN_GEMM_ROWS) * MIN_GEMM_ROWS
    if padded != rows:
        return apply(torch.cat((x, x.new_zeros(padded - rows, x.shape[1]))))[:rows]
    return apply(x)


@dataclass
class _GroupWeights:
    a: torch.Tensor  # [u, in, len(modules) * rank]: each adapter's A for the modules side by side
    bs: tuple[torch.Tensor | None, ...]  # per module [u, rank, out]; None when no active adapter targets it


@dataclass
class _ActiveSet:
    rank: int  # every active adapter zero-padded to this rank
    groups: dict[tuple[int, str], _GroupWeights]


@dataclass
class StepLora:
    """LoRA work plan for one forward pass: which rows go to which adapter's segment."""

    active: _ActiveSet
    gather: torch.Tensor | None  # [u * m] rows of x (len(x) = an appended zero row); None: x as is
    scatter: torch.Tensor | None  # [u * m] rows of y (padding adds exact zeros to row 0); None: y as is
    segment_rows: int  # m: rows per adapter segment, padded
    pads: bool  # whether `gather` refers to the appended zero row

    def apply(self, layer: int, group: str, x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        """Add the LoRA deltas of `group` at `layer` to the base outputs, in place."""
        weights = self.active.groups.get((layer, group))
        if weights is None:
            return
        segments, rows = weights.a.shape[0], self.segment_rows
        if self.gather is not None:
            source = torch.cat((x, x.new_zeros(1, x.shape[1]))) if self.pads else x
            x = source.index_select(0, self.gather)
        hidden = torch.bmm(x.view(segments, rows, -1), weights.a)
        rank = self.active.rank
        for j, (y, b) in enumerate(zip(outputs, weights.bs)):
            if b is None:
                continue
            delta = torch.bmm(hidden[:, :, j * rank : (j + 1) * rank], b).view(segments * rows, -1)
            if self.scatter is None:
                y.add_(delta)
            else:
                y.index_add_(0, self.scatter, delta)


class LoraBank:
    """Adapters resident on the compute device. Only the engine thread calls it."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        # the row padding only buys batch invariance from CPU BLAS; on a GPU it is wasted work
        self.min_rows = MIN_GEMM_ROWS if device.type == "cpu" else 1
        self._adapters: dict[str, LoraWeights] = {}
        self._active_sets: OrderedDict[tuple[str, ...], _ActiveSet] = OrderedDict()

    def add(self, name: str, weights: LoraWeights) -> None:
        self.remove(name)
        aligned_rank = -(-weights.rank // RANK_ALIGN) * RANK_ALIGN
        self._adapters[name] = weights.padded_to_rank(aligned_rank).to(self.device, self.dtype)

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            for key in [key for key in self._active_sets if name in key]:
                del self._active_sets[key]

    def prepare(self, row_adapters: list[str | None]) -> StepLora | None:
        """Plan the step's LoRA work; None when no row uses an adapter (zero LoRA cost)."""
        active = tuple(sorted({name for name in row_adapters if name is not None}))
        if not active:
            return None
        rows_of = {name: [] for name in active}
        for row, name in enumerate(row_adapters):
            if name is not None:
                rows_of[name].append(row)
        longest = max(len(rows) for rows in rows_of.values())
        segment_rows = -(-longest // self.min_rows) * self.min_rows
        active_set = self._active_set(active)
        if row_adapters == [name for name in active for _ in range(segment_rows)]:
            # rows already sit in equal, sorted segments (the engine groups arrivals by
            # adapter): the batch is its own segment layout, no gather or scatter needed
            return StepLora(active_set, None, None, segment_rows, False)
        zero_row = len(row_adapters)
        gather, scatter = [], []
        for name in active:
            pad = segment_rows - len(rows_of[name])
            gather += rows_of[name] + [zero_row] * pad
            scatter += rows_of[name] + [0] * pad
        as_tensor = lambda rows: torch.tensor(rows, device=self.device)  # noqa: E731
        pads = zero_row in gather
        return StepLora(active_set, as_tensor(gather), as_tensor(scatter), segment_rows, pads)

    def _active_set(self, names: tuple[str, ...]) -> _ActiveSet:
        cached = self._active_sets.get(names)
        if cached is not None:
            self._active_sets.move_to_end(names)
            return cached
        built = self._stack(names)
        self._active_sets[names] = built
        if len(self._active_sets) > _CONCAT_CACHE_SIZE:
            self._active_sets.popitem(last=False)
        return built

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def _stack(self, names: tuple[str, ...]) -> _ActiveSet:
        adapters = [self._adapters[name].padded_to_rank(max(self._adapters[n].rank for n in names)) for name in names]
        rank = adapters[0].rank
        shapes = {}  # module -> (in, out), read off any adapter that has it
        for adapter in adapters:
            for (_, module), (a, b) in adapter.pairs.items():
                shapes[module] = (a.shape[0], b.shape[1])

        def module_stacks(key: tuple[int, str]):
            """([u, in, rank], [u, rank, out]) for one linear; zeros for adapters that skip it."""
            if not any(key in adapter.pairs for adapter in adapters):
                return None
            in_features, out_features = shapes[key[1]]
            pairs = [
                adapter.pairs.get(key, (self._zeros(in_features, rank), self._zeros(rank, out_features)))
                for adapter in adapters
            ]
            return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

        layers = sorted({layer for adapter in adapters for layer, _ in adapter.pairs})
        groups = {}
        for layer in layers:
            for group, modules in GROUPS.items():
                stacks = [module_stacks((layer, m)) for m in modules]
                if all(stack is None for stack in stacks):
                    continue
                groups[(layer, group)] = self._group_weights(stacks, len(adapters), rank)
        return _ActiveSet(rank, groups)

    def _group_weights(self, stacks, count: int, rank: int) -> _GroupWeights:
        in_features = next(stack[0].shape[1] for stack in stacks if stack is not None)
        a = torch.cat([stack[0] if stack else self._zeros(count, in_features, rank) for stack in stacks], dim=2)
        return _GroupWeights(a.contiguous(), tuple(stack[1] if stack else None for stack in stacks))
