"""Decode attention on a CPU as one C++ kernel that reads the paged KV cache in place (setting `attention`).

Why: at the lengths a chat answer decodes at (40-200 keys and up), the torch path (model_runner's gather of each
row's blocks into a contiguous float32 copy padded to ATTENTION_BLOCK, then 48 tiny batched matmuls per layer
at 16 rows) cost as much of a 16-row step as the quantized linears (loadtests: `python -m
loadtests.bench_decode_step --breakdown 16 --position 128` with `--attention torch` and `kernel`; README). The
kernel (cpu_attention.cpp) reads each row's keys and values where they lie, only up to the row's own length,
and computes a (row, kv head) pair of the group's query heads on one thread in AVX-512: no copies, no padding,
no per-matrix library overhead.

What it keeps: scores, softmax and the weighted sum in float32 (K/V widened from the cache's bf16/fp16), and
every sum in a fixed order that depends only on the row's own length, so a row gets the same bits whatever else
shares the step (the engine's batch invariance; tests/test_cpu_attention.py). Its results differ from the torch
path's in the last bits (another summation order), so a runner uses one of the two for every single-query row.

Built on first use (models/native.py: g++ and ninja, about 10 s; `make install` builds it ahead). Without AVX-512 (the kernel's only fast path), without a compiler, or
when the build fails, the runner keeps the torch path and says why in the log.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from models import native

log = logging.getLogger("loraplex.engine")

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
MAX_HEAD_DIM, MAX_GROUP = 256, 8  # cpu_attention.cpp's MAX_CHUNKS * 16 and MAX_GROUP


@functools.cache
def load() -> tuple[object | None, str]:
    """(the kernel op, "") or (None, why not). Built once per process; torch caches the build on disk."""
    why = native.avx512() or native.build("loraplex_cpu_attention_avx512", SOURCE, native.AVX512_FLAGS)
    return (None, why) if why else (torch.ops.loraplex.paged_decode_attention, "")


def resolve(setting: str, device: torch.device, head_dim: int, group: int):
    """The kernel op for setting `attention` on `device` (a model of `head_dim` and `group` query heads per kv
    head), or None for the torch path."""
    if setting not in ("auto", "kernel", "torch"):
        raise ValueError(f"attention must be auto, kernel or torch, not {setting!r}")
    if setting == "torch" or device.type != "cpu":
        return None
    if head_dim % 16 or head_dim > MAX_HEAD_DIM or group > MAX_GROUP:
        op, why = None, f"head_dim {head_dim} and {group} query heads per kv head (the kernel: a multiple of 16 " \
                        f"up to {MAX_HEAD_DIM}, at most {MAX_GROUP})"
    else:
        op, why = load()
    if op is None:
        if setting == "kernel":
            raise ValueError(f"attention: kernel is not available here: {why}")
        log.warning("decode attention: the torch path (the CPU kernel is not available: %s)", why)
    return op


if __name__ == "__main__":  # `make install`: build the kernel now rather than at the first server start
    op, why = load()
    print("cpu attention kernel:", "built" if op is not None else f"not used ({why})")
