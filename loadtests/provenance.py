"""Where, when and how a benchmark figure was made: stored in every result file."""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def machine() -> str:
    """CPU model, cores, GPU, and the versions that decide speed."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import bitsandbytes

        bnb = f", bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        bnb = ""
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}{bnb}"


def stamp(module: str, argv: list[str] | None = None) -> dict:
    """{"date", "machine", "command"} for a result file written by `python -m <module> <argv>`."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["python -m", module, *args]),
    }
