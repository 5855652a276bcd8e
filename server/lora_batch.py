"""Batched multi-adapter LoRA math: every row of a forward pass may use a different adapter.

For the set of adapters active in a step we concatenate their A matrices column-wise and
their B matrices row-wise (cached per set, so this costs nothing while the set is stable).
One step then needs, per linear, `(x @ A_cat) * mask @ B_cat`, where `mask` zeroes the
columns that belong to other adapters than the row's. The mask is built once per step and
shared by all layers: the cost is two skinny matmuls per linear whatever the adapter mix,
instead of one PEFT pass per adapter.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters.lora import LoraWeights

_CONCAT_CACHE_SIZE = 16
# Ranks are zero-padded to a multiple of this. BLAS picks another kernel (another summation
# order) for very narrow matrices; with every adapter at least this wide, a row's LoRA delta
# is bit-identical whichever adapters share its batch.
RANK_ALIGN = 16


# BLAS (MKL/oneDNN on CPU) switches kernel, and summation order, for fewer rows than this.
MIN_GEMM_ROWS = 4


def matmul_rows(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight (a matrix, or a Linear applied to x), never with fewer than MIN_GEMM_ROWS rows.

    Zero rows pad small inputs so a request's numbers are bit-identical alone and in a batch.
    """
    apply = weight if callable(weight) else (lambda rows: rows @ weight)
    rows = x.shape[0]
    if rows < MIN_GEMM_ROWS:
        return apply(torch.cat((x, x.new_zeros(MIN_GEMM_ROWS - rows, x.shape[1]))))[:rows]
    return apply(x)


@dataclass
class _ActiveSet:
    names: tuple[str, ...]
    # (layer, module) -> (A_cat [in, R], B_cat [R, out]); absent when no active adapter touches it
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # row i of `owner_mask` is the column mask for adapter i-1; row 0 (no adapter) is all zero
    owner_mask: torch.Tensor


@dataclass
class StepLora:
    """LoRA state for one forward pass; `mask` is None when every row uses the same adapter."""

    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None

    def add_delta(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pair = self.pairs.get((layer, module))
        if pair is None:
            return y
        lora_a, lora_b = pair
        hidden = matmul_rows(x, lora_a)
        if self.mask is not None:
            hidden = hidden * self.mask
        return y + matmul_rows(hidden, lora_b)


class LoraBank:
    """Adapters resident on the compute device. Only the engine thread calls it."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self._adapters: dict[str, LoraWeights] = {}
        self._active_sets: OrderedDict[tuple[str, ...], _ActiveSet] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, weights: LoraWeights) -> None:
        self.remove(name)
        self._adapters[name] = weights.padded_to_rank(-(-weights.rank // RANK_ALIGN) * RANK_ALIGN).to(
            self.device, self.dtype
        )

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            for key in [key for key in self._active_sets if name in key]:
                del self._active_sets[key]

    def prepare(self, row_adapters: list[str | None]) -> StepLora | None:
        """Build the step's LoRA state; None when no row uses an adapter (zero LoRA cost)."""
        active = tuple(sorted({name for name in row_adapters if name is not None}))
        if not active:
            return None
        active_set = self._active_set(active)
        if len(active) == 1 and None not in row_adapters:
            return StepLora(active_set.pairs, None)
        index_of = {name: i + 1 for i, name in enumerate(active)}
        owners = torch.tensor([index_of.get(name, 0) if name else 0 for name in row_adapters], device=self.device)
        return StepLora(active_set.pairs, active_set.owner_mask[owners])

    def _active_set(self, names: tuple[str, ...]) -> _ActiveSet:
        cached = self._active_sets.get(names)
        if cached is not None:
            self._active_sets.move_to_end(names)
            return cached
        built = self._concatenate(names)
        self._active_sets[names] = built
        if len(self._active_sets) > _CONCAT_CACHE_SIZE:
            self._active_sets.popitem(last=False)
        return built

    def _concatenate(self, names: tuple[str, ...]) -> _ActiveSet:
        adapters = [self._adapters[name] for name in names]
        ranks = [adapter.rank for adapter in adapters]
        total_rank = sum(ranks)
        owner_mask = torch.zeros(len(names) + 1, total_rank, device=self.device, dtype=self.dtype)
        offset = 0
        for i, rank in enumerate(ranks):
            owner_mask[i + 1, offset : offset + rank] = 1
            offset += rank
        keys = sorted({key for adapter in adapters for key in adapter.pairs})
        pairs = {}
        for key in keys:
            a_parts, b_parts = [], []
            for adapter in adapters:
                pair = adapter.pairs.get(key)
                if pair is None:  # this adapter leaves the module alone: zero block keeps columns aligned
                    some_a, some_b = next(p for p in (ad.pairs.get(key) for ad in adapters) if p is not None)
                    pair = (
                        some_a.new_zeros(some_a.shape[0], adapter.rank),
                        some_b.new_zeros(adapter.rank, some_b.shape[1]),
                    )
                a_parts.append(pair[0])
                b_parts.append(pair[1])
            pairs[key] = (torch.cat(a_parts, dim=1).contiguous(), torch.cat(b_parts, dim=0).contiguous())
        return _ActiveSet(names, pairs, owner_mask)
