"""Scale-out on Ray Serve: what the replicas and the ingress hop do, 2 engine replicas against 1.

    python -m loadtests.bench_ray [--requests 256] [--concurrency 8]

On this machine (2 cores, no GPU) two replicas share the same two cores, so the figures show the
mechanism (affinity, spill, the hop's cost, faults), not a speed-up: on CUDA each replica has its
own GPU. Default model (SmolLM2-135M, NF4, float32 compute), 32 random rank-8 experts registered
through the vLLM-compatible endpoint, every replica with max_gpu_adapters 8 and max_batch_size 8.

1. Affinity: --requests streamed chat requests at --concurrency, each on an expert drawn from a Zipf
   distribution (s = 1.1, fixed seed) over the 32; the ingress's `loraplex_replica_requests_total`
   says whether the replica had the expert in its multiplexing set (hit) or had to take it in (miss:
   an adapter load per 1,000 requests), for 1 and 2 replicas.
2. The ingress hop: time to first token (p50/p99) of 48 streamed requests on the base at concurrency
   4, for the single-process server, 1 replica and 2 replicas.
3. A new expert: from `POST /v1/adapters` to the first streamed token on each replica (a burst of
   2 x max_batch_size requests right after the registration reaches both).
4. A replica killed: the Zipf load again, one replica killed after 3 s; requests that failed (503
   replica_unavailable) against those running on it when it died, and whether later requests succeed.
Writes loadtests/results/bench_ray.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from tests.support.harness import REPO, ServerProcess, free_port, make_peft_adapter
from loadtests.loadgen import percentile
from loadtests.provenance import stamp

EXPERTS = 32
ADMIN = {"Authorization": "Bearer k"}
SETTINGS = dict(quantization="nf4", compute_dtype="float32", max_batch_size=8, max_gpu_adapters=8,
                max_cpu_adapters=32, context_window=512, default_max_tokens=16, router="none", ui=False,
                fine_tuning=False, admin_key=["k"])
PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Explain rain.", "Name a famous painter.",
           "How do birds fly?", "Describe a city at night.", "What makes a good friend?", "Why is the sky blue?"]


def make_experts(root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from models.base_model import convert_embedded
    from server.settings import Settings

    model = AutoModelForCausalLM.from_pretrained(convert_embedded(Settings().cache_dir), dtype=torch.float32)
    for i in range(EXPERTS):
        make_peft_adapter(model, root / f"e{i:02d}", seed=i, rank=8, targets=("q_proj", "v_proj"), b_std=0.01)
    return root


def zipf_models(count: int, seed: int = 0) -> list[str]:
    weights = [1 / (rank + 1) ** 1.1 for rank in range(EXPERTS)]
    rng = random.Random(seed)
    return [f"e{i:02d}" for i in rng.choices(range(EXPERTS), weights, k=count)]


def _has_text(line: str) -> bool:
    """A chunk carrying answer text (not the opening chunk with the role and empty content)."""
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    out = {"model": model, "status": 0, "ttft": None, "replica": None, "error": None, "start": start}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            out["status"], out["replica"] = response.status_code, response.headers.get("x-loraplex-replica")
            async for line in response.aiter_lines():
                if '"error"' in line:
                    out["error"] = json.loads(line[6:])["error"]["code"]
                elif line.startswith("data: {") and out["ttft"] is None and _has_text(line):
                    out["ttft"] = time.perf_counter() - start
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    out["end"] = time.perf_counter()
    return out


async def load(url: str, models: list[str], concurrency: int, max_tokens: int = 8) -> list[dict]:
    queue = list(reversed(list(enumerate(models))))
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def worker():
            while queue:
                i, model = queue.pop()
                results.append(await _one(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def ttft_summary(results: list[dict]) -> dict:
    values = [r["ttft"] * 1000 for r in results if r["ttft"] is not None]
    return {"p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1),
            "ok": sum(1 for r in results if r["status"] == 200 and r["error"] is None), "requests": len(results)}


def replica_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for adapter, value in re.findall(r'^loraplex_replica_requests_total\{adapter="(\w+)",replica="\w+"\} (\S+)$',
                                     httpx.get(url + "/metrics").text, re.M):
        counts[adapter] = counts.get(adapter, 0) + float(value)
    return counts


def register_all(url: str, roots: Path) -> None:
    for i in range(EXPERTS):
        response = httpx.post(url + "/v1/load_lora_adapter", headers=ADMIN,
                              json={"lora_name": f"e{i:02d}", "lora_path": str(roots / f"e{i:02d}")}, timeout=60)
        response.raise_for_status()


def base_latency(url: str) -> dict:
    base = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    asyncio.run(load(url, [base] * 8, 4, 16))  # warm-up
    return ttft_summary(asyncio.run(load(url, [base] * 48, 4, 16)))


def affinity(url: str, requests: int, concurrency: int) -> dict:
    before = replica_counts(url)
    started = time.perf_counter()
    results = asyncio.run(load(url, zipf_models(requests), concurrency))
    elapsed = time.perf_counter() - started
    after = replica_counts(url)
    hits, misses = after.get("hit", 0) - before.get("hit", 0), after.get("miss", 0) - before.get("miss", 0)
    return {"requests": requests, "hit_rate": round(hits / max(1, hits + misses), 3),
            "loads_per_1000": round(1000 * misses / max(1, hits + misses), 1),
            "requests_per_s": round(requests / elapsed, 2), "ttft": ttft_summary(results),
            "replicas_used": len({r["replica"] for r in results if r["replica"]})}


def new_expert(url: str, roots: Path, batch: int) -> dict:
    from tests.support import upload_files  # the multipart fields of POST /v1/adapters

    files = upload_files(roots / "e00")
    started = time.perf_counter()
    created = httpx.post(url + "/v1/adapters", headers=ADMIN, data={"name": "fresh"}, files=files, timeout=60)
    created.raise_for_status()
    registered = time.perf_counter() - started
    results = asyncio.run(load(url, ["fresh"] * (2 * batch), 2 * batch, 8))
    first: dict[str, float] = {}
    for r in results:
        if r["ttft"] is not None and r["replica"]:
            at = r["end"] - started  # a bound: the request ended after its first token
            first[r["replica"]] = min(first.get(r["replica"], at), at)
    return {"register_ms": round(registered * 1000, 1),
            "first_token_by_replica_ms": sorted(round(v * 1000) for v in first.values())}


def kill_one(url: str, requests: int, concurrency: int) -> dict:
    from server.startup import ray_serve

    outcome: dict = {}

    def killer():
        time.sleep(3)
        victim = sorted(httpx.get(url + "/health").json()["replicas"])[0]
        outcome["victim"], outcome["at"] = victim, time.perf_counter()
        ray_serve.kill_replica(victim)

    thread = threading.Thread(target=killer)
    thread.start()
    results = asyncio.run(load(url, zipf_models(requests, seed=1), concurrency))
    thread.join()
    failed = [r for r in results if r["status"] != 200 or r["error"] is not None]
    later = asyncio.run(load(url, zipf_models(16, seed=2), 4))
    return {"requests": requests, "failed": len(failed),
            "failed_codes": sorted({r["error"] or str(r["status"]) for r in failed}),
            "failed_were_on_victim": all(r["replica"] in (None, outcome["victim"]) for r in failed),
            "in_flight_on_victim": sum(1 for r in results if r["replica"] == outcome["victim"]
                                       and r["start"] <= outcome["at"] <= r["end"]),
            "later_ok": sum(1 for r in later if r["status"] == 200 and r["error"] is None), "later": len(later)}


def ray_phase(replicas: int, data: Path, roots: Path, args) -> dict:
    from server.settings import Settings
    from server.startup import ray_serve

    port = free_port()
    settings = Settings(**SETTINGS, replicas=replicas, port=port, data_dir=str(data / f"ray{replicas}"),
                        adapter_roots=[str(roots)])
    ray_serve.start(settings)
    url = f"http://127.0.0.1:{port}"
    try:
        register_all(url, roots)
        result = {"ttft_base": base_latency(url), "affinity": affinity(url, args.requests, args.concurrency)}
        if replicas > 1:
            result["new_expert"] = new_expert(url, roots, SETTINGS["max_batch_size"])
            result["kill"] = kill_one(url, args.requests // 2, args.concurrency)
        return result
    finally:
        ray_serve.shutdown()


def single_phase(data: Path, roots: Path, args) -> dict:
    server = ServerProcess(data, {**SETTINGS, "adapter_roots": [str(roots)]}).start()
    try:
        register_all(server.base_url, roots)
        started = time.perf_counter()
        results = asyncio.run(load(server.base_url, zipf_models(args.requests), args.concurrency))
        return {"ttft_base": base_latency(server.base_url),
                "zipf": {"requests_per_s": round(args.requests / (time.perf_counter() - started), 2),
                         "ttft": ttft_summary(results)}}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = make_experts(work / "roots")
        result = {**stamp("loadtests.bench_ray", argv), "experts": EXPERTS, "settings": SETTINGS,
                  "requests": args.requests, "concurrency": args.concurrency,
                  "single_process": single_phase(work, roots, args),
                  "replicas_1": ray_phase(1, work, roots, args),
                  "replicas_2": ray_phase(2, work, roots, args)}
    out = REPO / "loadtests" / "results" / "bench_ray.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
