"""This machine's Python narrowed to what the device image holds plus the wheels the GPU kit carries: a
virtual environment whose site-packages links only those distributions of the running environment.

Why: the device image has no pydantic, fastapi, uvicorn, llguidance, bitsandbytes or openai, and a lent GPU
gives ~15 minutes, so an import the image cannot satisfy must fail here, in the suite, not there. A
narrowed environment is what the image is: modules *and* package metadata of everything else are absent,
so libraries that probe for optional packages (transformers' `is_..._available`) see what they would see
there. tests/test_gpu_kit.py and tests/test_bench_gpu.py run the kit's scripts (and the server they start)
with its interpreter.

    python -m loadtests.image_env DIR      # build it; prints DIR/bin/python

The lists: loadtests/device_image_packages.txt (from the device tool's KINDS.md) and the WHEELS array of
loadtests/gpu_wheels.sh. Versions are this machine's, not the image's: what this checks is which
distributions are imported, not which versions.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE_LIST = HERE / "device_image_packages.txt"
WHEELS_SCRIPT = HERE / "gpu_wheels.sh"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = IMAGE_LIST.read_text().splitlines()
    return {normalize(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def wheel_pins() -> dict[str, str]:
    """name -> version of every wheel gpu_wheels.sh downloads (its WHEELS=( ... ) array)."""
    match = re.search(r"^WHEELS=\((.*?)^\)", WHEELS_SCRIPT.read_text(), re.S | re.M)
    if match is None:
        raise ValueError(f"no WHEELS=( ... ) array in {WHEELS_SCRIPT}")
    pins = {}
    for line in match.group(1).splitlines():
        for word in line.split("#", 1)[0].split():
            name, _, version = word.partition("==")
            pins[normalize(name)] = version
    return pins


def allowed(wheels: bool = True) -> set[str]:
    return image_packages() | (set(wheel_pins()) if wheels else set())


def _top_level(path) -> str | None:
    parts = Path(str(path)).parts
    return parts[0] if parts and parts[0] not in ("..", "/") else None


def build(target: Path, wheels: bool = True) -> Path:
    """The narrowed environment at `target` (made once; reused when its marker is there); its python.
    `wheels=False`: the bare image, without what gpu_wheels.sh carries."""
    target = Path(target)
    python = target / "bin" / "python"
    marker = target / ".image-env-complete"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(target)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    keep = allowed(wheels)
    owners: dict[str, set[bool]] = {}  # top-level entry -> whether its owners are allowed
    files: dict[str, list[Path]] = {}  # top-level entry -> files of allowed owners (for shared entries)
    roots: dict[str, Path] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or not dist.files:
            continue
        ok = normalize(name) in keep
        for entry in dist.files:
            top = _top_level(entry)
            if top is None or top.endswith(".pth") and not ok:
                continue
            owners.setdefault(top, set()).add(ok)
            root = Path(dist.locate_file(""))
            roots.setdefault(top, root)
            if ok:
                files.setdefault(top, []).append(root / entry)
    for top, oks in owners.items():
        source = roots[top] / top
        if oks == {True} and source.exists():
            (site / top).symlink_to(source)
        elif True in oks:  # shared with a distribution that is not there (a namespace package): file by file
            for path in files[top]:
                link = site / path.relative_to(roots[top])
                if path.exists() and not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)
    marker.write_text("ok\n")
    return python


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
    os._exit(0)
