"""Host values onto the compute device without making the host wait.

`torch.tensor(values, device="cuda")` copies from pageable memory, which PyTorch does synchronously:
the host waits until the stream has finished everything queued before it, so each such call in a step
stalls the host behind the device (and leaves the device idle while the host then prepares the next
ops). A tensor built on the host, pinned (PyTorch's caching host allocator makes that cheap after the
first steps, and keeps a pinned block from reuse until its copy has run) and copied with
non_blocking=True is queued like a kernel instead. On a CPU the tensor is simply built there.
"""
from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, possibly nested) as a tensor on `device`, queued rather than waited for."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
