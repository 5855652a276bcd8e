"""Building this project's C++ CPU kernels on the machine that runs them (torch's C++ extension loader).

Why built here rather than shipped: a kernel compiled for the CPU in front of it (AVX-512, BF16 dot products)
is what makes the CPU path fast, and a wheel per instruction set is more than a small project should carry.
torch's loader compiles with g++ and ninja into its extension cache (about 10 s per kernel, once per machine;
`make install` does it ahead) and loads it as torch ops. Anything that goes wrong (no compiler, an older CPU)
is reported as a reason, and the caller keeps its pure-torch path.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# the instruction sets a kernel is compiled for, named in the extension's name (not -march=native: a build
# cache shared between machines must not hand one CPU another's instructions)
AVX512_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
AVX512_BF16_FLAGS = [*AVX512_FLAGS, "-mavx512bf16"]


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. avx512_bf16); False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return flag in flags.split()


def build(name: str, source: Path, flags: list[str]) -> str:
    """Compile and load `source` as torch ops (its TORCH_LIBRARY); "" when loaded, else why not."""
    try:
        from torch.utils import cpp_extension

        _find_ninja()
        cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - a missing compiler, ninja or header: the torch path still works
        return f"it did not build: {type(exc).__name__}: {str(exc).strip()[:300]}"
    return ""


def _find_ninja() -> None:
    """torch's loader runs `ninja` from PATH; a server started as .venv/bin/loraplex may not have the venv's
    bin (where the ninja wheel puts it) there, so it is added for this process."""
    if shutil.which("ninja"):
        return
    import ninja

    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def avx512() -> str:
    """"" when torch's CPU capability is AVX-512, else why a kernel for it cannot run here."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "" if capability == "AVX512" else f"this CPU's capability is {capability}; the kernel needs AVX-512"
