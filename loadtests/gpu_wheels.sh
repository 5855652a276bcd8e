#!/usr/bin/env bash
# The wheels the GPU kit (loadtests/gpu_run.sh) needs beyond the device image, downloaded into .whl/ (gitignored),
# which the device tool carries with the working tree (carry [".whl"]; tree + wheels: 64 MiB at most).
#   bash loadtests/gpu_wheels.sh        (here, where PyPI is reachable; the device machine reaches nothing)
# The image ('cuda', nvidia-h200) has Python 3.12, torch 2.11+cu130, triton, transformers, peft, safetensors,
# prometheus-client, httpx, pyyaml, numpy... (loadtests/device_image_packages.txt) but not what the server's HTTP
# edge, its structured outputs, the NF4 base and the e2e check's client import. Exactly these, each at the version
# the suite runs here, with --no-deps: what each requires and the image lacks is in the list too
# (tests/test_gpu_kit.py checks both: the list covers the kit's imports, and every listed wheel's requirements).
# bitsandbytes ships one native library per CUDA/ROCm/XPU release (43 MB); the image's torch is built for CUDA
# 13.0, so only libbitsandbytes_cuda130.so (and the small CPU one) is kept and the wheel is packed again
# without the rest (its RECORD rewritten to match): about 2 MB instead of 43.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  # the NF4 base (transformers' BitsAndBytesConfig)
  bitsandbytes==0.50.2
  # the HTTP edge: server/api (FastAPI on pydantic, multipart uploads of fine-tuning files) under uvicorn
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 python-multipart==0.0.34 uvicorn==0.55.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  # structured outputs: the grammar matcher built at start for the served tokenizer (server/api/structured.py)
  llguidance==1.9.1
  # the e2e check's client (loadtests/gpu_e2e.py), as the suite's integration tests use it
  openai==3.60.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  # the image has these, at versions not read there: carried so the minimums above hold (pydantic needs
  # typing-extensions >= 4.16, openai anyio >= 4.10); a few hundred kB
  typing-extensions==4.16.0 anyio==4.16.0
)
PYTHON=${PYTHON:-python3}
# pip matches each manylinux_2_N tag exactly: N up to 35 (the image's Python 3.12.3 is Ubuntu 24.04's, glibc 2.39;
# llguidance 1.9.1 is built for glibc 2.31)
mkdir -p .whl
rm -f .whl/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
# bitsandbytes without the native libraries the image cannot use
"$PYTHON" - .whl/bitsandbytes-*.whl <<'EOF'
import sys, zipfile, os
path = sys.argv[1]
keep = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
def dropped(name):
    base = os.path.basename(name)
    return base.startswith("libbitsandbytes_") and base not in keep
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if dropped(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
        out.writestr(info, data)
os.replace(tmp, path)
EOF
ls -l .whl
du -cb .whl/*.whl | tail -1 | awk '{printf "wheels: %.1f MiB\n", $1 / 1048576}'
