"""The GPU kit (loadtests/gpu_run.sh) starts on the device image: what it imports is there or carried.

The device image lacks pydantic, fastapi, uvicorn, llguidance, bitsandbytes and openai; a lent GPU gives
~15 minutes, so a missing import must fail here. loadtests/image_env.py narrows this machine's Python to
the image's package list (loadtests/device_image_packages.txt) plus loadtests/gpu_wheels.sh's wheels;
tests/test_bench_gpu.py runs the kit's three scripts under it (a tiny model on CPU), this file checks
the imports of every module the kit and the server's start path load, and the wheel list itself."""
import importlib.metadata
import subprocess

import pytest
from packaging.requirements import Requirement

from tests.support.harness import REPO
from loadtests.image_env import build, image_packages, normalize, wheel_pins

# what gpu_run.sh runs, and what `loraplex serve` loads before it answers (the engine thread's lazy
# imports are covered by the scripts' runs in tests/test_bench_gpu.py)
KIT = ["loadtests.gpu_smoke", "loadtests.bench_gpu", "loadtests.gpu_e2e"]
SERVER = ["server.startup.cli", "server.startup.serve", "server.api.app", "server.api.structured",
          "server.engine.lora_kernels", "server.engine.decode_graphs", "bitsandbytes", "llguidance.hf", "openai"]
# the image's Python, for the wheels' requirement markers
IMAGE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _imports(python, modules):
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    return subprocess.run([str(python), "-c", code, *modules], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})


def test_the_kit_and_the_server_import_on_the_image_with_the_carried_wheels(image_python):
    done = _imports(image_python, KIT + SERVER)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_the_wheels_the_bench_and_smoke_still_import_but_the_server_does_not(tmp_path):
    """The bare image: the benchmark and the smoke checks need nothing carried to import (bitsandbytes is
    imported when a base is loaded); the server needs uvicorn (and pydantic...). The second half shows the
    narrowing works: the same import that passes above fails here."""
    bare = build(tmp_path / "bare", wheels=False)
    assert _imports(bare, ["loadtests.bench_gpu", "loadtests.gpu_smoke"]).returncode == 0
    done = _imports(bare, ["server.startup.serve"])
    assert done.returncode != 0 and "No module named 'uvicorn'" in done.stderr


def test_every_carried_wheel_is_the_version_tested_here_and_brings_what_it_requires():
    """gpu_wheels.sh downloads with --no-deps: every requirement of a carried wheel (for the image's Python)
    must be in the image or carried too; and each pin is the version this suite runs, so the kit tested
    here is the kit that runs there."""
    pins, image = wheel_pins(), image_packages()
    assert "bitsandbytes" in pins and "pydantic" in pins
    for name, version in pins.items():
        dist = importlib.metadata.distribution(name)
        assert dist.version == version, f"{name}: gpu_wheels.sh pins {version}, this environment has {dist.version}"
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_MARKERS):
                continue
            needed = normalize(requirement.name)
            assert needed in pins or needed in image, f"{name} requires {requirement}: not in the image nor carried"


@pytest.mark.parametrize("name", ["pydantic", "fastapi", "uvicorn", "llguidance", "bitsandbytes", "openai"])
def test_the_image_list_lacks_what_the_issue_says_it_lacks(name):
    assert normalize(name) not in image_packages()
