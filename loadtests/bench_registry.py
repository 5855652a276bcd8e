"""Registry benchmark (issue 4): how fast a new expert becomes usable, and what it costs.

    python -m loadtests.bench_registry [--rounds 5]

On the default SmolLM2 (NF4, float32 compute) with random rank-16 all-linear adapters made
with peft:
  1. registered-to-first-token: POST /v1/adapters returns -> first streamed token of a
     request that uses the new expert (goal < 1 s);
  2. store-to-device load: reading an adapter from the managed store and placing it in the
     device bank, in this process, as the engine does on a cold request (goal < 50 ms);
  3. a 32-token request on a resident adapter vs the same request on the base.
Writes loadtests/results/bench_registry.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from adapters.lora import BaseShape, load_lora
from adapters.lora import LINEAR_MODULES
from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess, make_peft_adapter
from server.engine.lora_batch import LoraBank
from models.base_model import EMBEDDED_NAME, convert_embedded
from server.settings import Settings

ADMIN = {"Authorization": "Bearer bench"}
MESSAGES = [{"role": "user", "content": "Describe the sea in one sentence."}]


def _first_token_s(base_url: str, model: str, max_tokens: int = 1, since: float | None = None):
    """(seconds to the first content chunk, seconds to the end, completion tokens), from `since`."""
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter() if since is None else since
    first, tokens = None, 0
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_registry.json"))
    args = parser.parse_args()

    cache_dir = Settings().cache_dir
    folder = convert_embedded(cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-bench-registry-"))
    roots = workdir / "roots"
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapter = make_peft_adapter(fp32, roots / "expert", seed=7, rank=16, targets=LINEAR_MODULES, b_std=0.005)
    shape = BaseShape.from_config(fp32.config)
    del fp32

    settings = {"compute_dtype": "float32", "adapter_roots": [str(roots)], "admin_key": ["bench"]}
    server = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    try:
        _first_token_s(server.base_url, EMBEDDED_NAME)  # warm-up
        to_first_token = []
        for i in range(args.rounds):
            response = httpx.post(server.base_url + "/v1/adapters", headers=ADMIN, timeout=120,
                                  json={"name": f"expert{i}", "path": str(adapter)})
            response.raise_for_status()  # the clock starts when the registration has returned
            first, _, _ = _first_token_s(server.base_url, f"expert{i}", since=time.perf_counter())
            to_first_token.append(first)
        base_runs = [_first_token_s(server.base_url, EMBEDDED_NAME, 32) for _ in range(3)]
        expert_runs = [_first_token_s(server.base_url, "expert0", 32) for _ in range(3)]
        store_folder = next((workdir / f"data-{server.port}" / "store").iterdir())
    finally:
        server.stop()

    bank = LoraBank(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, shape, slots=10)
    load_ms = []
    for i in range(10):
        start = time.perf_counter()
        bank.add(f"x{i}", load_lora(store_folder, shape))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        load_ms.append((time.perf_counter() - start) * 1000)
    shutil.rmtree(workdir, ignore_errors=True)

    def tok_per_s(runs):
        return statistics.median(tokens / total for _, total, tokens in runs)

    report = {
        **stamp("loadtests.bench_registry"),
        "registered_to_first_token_s": {"median": statistics.median(to_first_token), "max": max(to_first_token),
                                        "runs": to_first_token},
        "store_to_device_load_ms": {"median": statistics.median(load_ms), "max": max(load_ms)},
        "adapter_vs_base_single_request": tok_per_s(expert_runs) / tok_per_s(base_runs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"registered -> first token: median {report['registered_to_first_token_s']['median'] * 1000:.0f} ms, "
          f"max {report['registered_to_first_token_s']['max'] * 1000:.0f} ms (goal < 1000 ms)")
    print(f"store -> device load (rank 16, all linear): median {report['store_to_device_load_ms']['median']:.1f} ms "
          f"(goal < 50 ms)")
    print(f"32-token request, resident adapter / base: {report['adapter_vs_base_single_request']:.2f}")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
