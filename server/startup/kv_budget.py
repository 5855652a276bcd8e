"""How many KV cache blocks the server gets: the `kv_cache_memory` setting turned into a block
count for the loaded model, checked before the pool is allocated.

Checked at start, not discovered at the first long request: a budget that cannot hold one request
of the full context window is refused with both numbers, so the operator can raise the budget or
lower context_window.
"""
from __future__ import annotations

import torch

from server.settings import ConfigError, Settings, parse_memory

AUTO_CUDA_FRACTION = 0.9
AUTO_CPU_RAM_SHARE = 0.25


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _available_ram()


def kv_budget_bytes(settings: Settings, device: torch.device, block_bytes: int, context_window: int,
                    reserved: int = 0) -> int:
    """`reserved`: bytes already promised to the adapter slot pool and the CUDA graphs, not free for the KV cache."""
    if settings.kv_cache_tokens is not None:
        return (-(-settings.kv_cache_tokens // settings.kv_block_size) + 1) * block_bytes  # + the padding block
    amount, fraction = parse_memory(settings.kv_cache_memory)
    if amount is not None:
        return amount
    if fraction is not None:
        return int(max(_free_memory(device) - reserved, 0) * fraction)
    if device.type == "cuda":
        return int(max(_free_memory(device) - reserved, 0) * AUTO_CUDA_FRACTION)
    per_request = -(-context_window // settings.kv_block_size)  # blocks of one full-context request
    wanted = (settings.max_batch_size * per_request + 1) * block_bytes  # + the padding block
    return max(min(wanted, int(_free_memory(device) * AUTO_CPU_RAM_SHARE)), (per_request + 1) * block_bytes)


def graph_budget_bytes(settings: Settings, device: torch.device, config, dtype: torch.dtype, context_window: int,
                       triton_lora: bool, adapter_slots: int, adapter_bytes: int) -> int:
    """Bytes the CUDA graphs captured at start will take (decode_graphs.plan_shapes' estimate for the shapes
    that fit GRAPH_MEMORY_SHARE of the memory free after the base and the adapter slots); 0 without them.
    Taken out of free memory before the KV cache is sized, so capturing them cannot run out of memory."""
    if settings.cuda_graphs != "auto" or device.type != "cuda":
        return 0
    from server.engine.decode_graphs import GRAPH_MEMORY_SHARE, Dims, plan_shapes

    lora_size = lambda rows: 0  # noqa: E731
    if triton_lora:
        from server.engine.lora_kernels import StaticSegments

        lora_size = lambda rows: StaticSegments.size(rows, adapter_slots)  # noqa: E731
    budget = int(max(_free_memory(device) - adapter_bytes, 0) * GRAPH_MEMORY_SHARE)
    max_width = -(-context_window // settings.kv_block_size)
    _, estimate = plan_shapes(Dims.of(config, dtype, settings.kv_block_size), settings.max_batch_size, max_width,
                              triton_lora, lora_size, budget)
    return estimate


def plan_kv_blocks(settings: Settings, device: torch.device, block_bytes: int, context_window: int,
                   adapter_bytes: int = 0, graph_bytes: int = 0) -> int:
    """Blocks in the pool (the padding block included); ConfigError when one full request cannot fit, or
    when the KV cache, the adapter slots (`adapter_bytes`) and the CUDA graphs (`graph_bytes`) together do
    not fit in free memory. The slots and the graphs are taken out of free memory first."""
    block_size = settings.kv_block_size
    reserved = adapter_bytes + graph_bytes
    budget = kv_budget_bytes(settings, device, block_bytes, context_window, reserved)
    free = _free_memory(device)
    if budget + reserved > free:
        where = "free on the GPU" if device.type == "cuda" else "of available RAM"
        graphs = f", the CUDA graphs ({graph_bytes / 2**30:.2f} GiB)" if graph_bytes else ""
        raise ConfigError(
            f"the adapter slots ({settings.max_gpu_adapters} x rank {settings.max_adapter_rank}, with the step "
            f"stack where the torch LoRA kernels need it: {adapter_bytes / 2**30:.2f} GiB){graphs} and the KV "
            f"cache ({budget / 2**30:.2f} GiB) need {(budget + reserved) / 2**30:.2f} GiB, but only "
            f"{free / 2**30:.2f} GiB is {where} after the base model loaded. Lower max_gpu_adapters, "
            "max_adapter_rank or kv_cache_memory" + (", or set cuda_graphs: off." if graph_bytes else "."))
    usable = budget // block_bytes - 1  # block 0 pads block tables
    needed = -(-context_window // block_size)
    if usable < needed:
        raise ConfigError(
            f"kv_cache_memory ({settings.kv_cache_memory}: {budget:,} bytes) holds {max(usable, 0) * block_size:,} "
            f"tokens of KV cache, but one request of the full context window needs {context_window:,} tokens "
            f"({(needed + 1) * block_bytes:,} bytes). Raise kv_cache_memory or lower context_window."
        )
    return usable + 1
