"""A step's LoRA deltas computed row by row by a C++ kernel over the step stack (CPU; `lora_kernels: cpu`).

Why: once the base's linears and attention had their own kernels (models/int4_matmul.cpp, cpu_attention.cpp),
the torch path's LoRA became a large share of a step over several experts: its wide path multiplies every row
by every active adapter (u times the FLOPs) in about twenty small ops per layer, each paying the library's and
the thread pool's fixed cost, which on two cores is most of what they cost. The kernel (cpu_lora.cpp) reads the
step stack the torch path builds (lora_batch._StepStack) and computes, for each row, only the adapters the
row asks for, mixtures included (each (adapter, weight) in the row's own order), in one call per group of
linears: x @ A for the group's modules at once, then each module's B added into its output in place.

The stack is held in bfloat16 for it (LoraBank): the kernel is bound by memory, not arithmetic (four rank-16
experts on the default model are about 90 MB of float32 weights a step, more than the base's int4 linears),
and bf16 halves that; the weights are widened to float32 exactly and every product and sum is float32. The
rounding, a relative 2^-9 of each LoRA weight, moves a delta far less than the base's 4-bit groups move the
base (tests/test_cpu_lora.py bounds it against the float32 torch path).

Every sum runs in a fixed order that depends on the row alone, so a row gets the same bits whatever shares the
step, on every step shape (decode rows, prompt chunks, mixtures): the kernel serves all of a CPU's steps, so
which rows meet never changes a number. Built on first use (models/native.py); without AVX-512, a compiler,
or in another compute dtype than float32, `auto` keeps the torch path.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from models import native

SOURCE = Path(__file__).with_name("cpu_lora.cpp")
MAX_HIDDEN = 1024  # cpu_lora.cpp: modules * a_rank of one group
ITEM_ROWS = 4  # cpu_lora.cpp: rows on one adapter that share its loads


@functools.cache
def load() -> tuple[object | None, str]:
    """(the kernel op, "") or (None, why not). Built once per process; torch caches the build on disk."""
    why = native.avx512() or native.build("loraplex_cpu_lora_avx512", SOURCE, native.AVX512_FLAGS)
    return (None, why) if why else (torch.ops.loraplex_lora.lora_rows, "")


def usable(device: torch.device, dtype: torch.dtype, max_rank: int) -> str:
    """"" when the kernel can serve a bank on `device` in `dtype` with adapters up to `max_rank`, else why not."""
    if device.type != "cpu":
        return "it is a CPU kernel"
    if dtype != torch.float32:
        return f"it computes in float32, not {str(dtype).removeprefix('torch.')}"
    if 3 * max_rank > MAX_HIDDEN:
        return f"rank {max_rank} is above its {MAX_HIDDEN // 3}"
    return load()[1]


if __name__ == "__main__":  # `make install`: build the kernel now rather than at the first server start
    op, why = load()
    print("cpu LoRA kernel:", "built" if op is not None else f"not used ({why})")
