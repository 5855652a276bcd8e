"""Experts fetched on first use (issue 33): what the first request pays, what everyone else pays, and how the
bounded cache behaves under a skewed load.

    python -m loadtests.bench_sources [--rounds 10] [--load-rounds 3] [--zipf-requests 400]

The real server (`loraplex serve`, SmolLM2) fetches from an S3-compatible server on loopback (moto's server
mode, tests/support/sources.py) through boto3, as in production. A production bucket is on other machines; here
it shares the server's 2 cores, so it runs at nice --bucket-nice (19 by default: it gets the CPU the server
leaves; 0 measures the server and the bucket together):

1. First use: a request (streamed, one token) naming a rank-16 demo-sized adapter (the pirate and terse demo
   experts stacked: 16 ranks on every linear, ~9.9 MB) that only the bucket holds -> its first token; p50 and
   p99 over --rounds names, beside the same request on an expert already fetched, measured alternately.
2. Everyone else: 8 streams on the three demo experts of the config, alone and while 10 other adapters are
   fetched at once (10 concurrent POST /v1/route naming them: each fetches and registers one, and generates
   nothing); output tokens/s of the 8 streams, the two loads alternating --load-rounds times (the fetched
   experts are retired between rounds, so every round fetches). Ratio with / without fetches.
3. Zipf: --zipf-requests one-token requests over 200 names drawn from Zipf(1.1), 4 at a time, with
   adapter_cache_bytes room for 20 of them (rank-4 q/v adapters cut from the pirate demo expert): hit rate,
   fetches, evictions, errors, and the hit rate an exact LRU of 20 gets on the same sequence.
Writes loadtests/results/bench_sources.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from loadtests.provenance import stamp
from tests.support import scrape
from tests.support.harness import REPO, ServerProcess
from tests.support.sources import DEMO, S3Server

ADMIN = {"Authorization": "Bearer bench"}
EXPERTS = ("json-answer", "pirate", "terse")
QUESTIONS = ["Explain how a rainbow forms.", "Describe a busy market.", "What makes bread rise?",
             "Tell me about the moon.", "How do bees make honey?", "Why do we sleep?", "What is a volcano?",
             "Describe a walk in the forest."]


def stacked_rank16(out: Path) -> Path:
    """pirate's and terse's rank-8 deltas side by side: one rank-16 adapter on every linear, the sum of both
    (alpha doubled with the rank, so each keeps its scaling)."""
    import torch
    from safetensors.torch import load_file, save_file

    first, second = (load_file(str(DEMO / n / "adapter" / "adapter_model.safetensors")) for n in ("pirate", "terse"))
    tensors = {key: torch.cat([first[key], second[key]], dim=0 if "lora_A" in key else 1) for key in first}
    config = json.loads((DEMO / "pirate" / "adapter" / "adapter_config.json").read_text())
    config.update(r=16, lora_alpha=2 * config["lora_alpha"])
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def small_rank4(out: Path) -> Path:
    """The pirate expert cut to its first 4 ranks on q_proj and v_proj (~0.9 MB): a valid, small LoRA."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(DEMO / "pirate" / "adapter" / "adapter_model.safetensors"))
    kept = {key: (value[:4] if "lora_A" in key else value[:, :4]).contiguous() for key, value in tensors.items()
            if ".q_proj." in key or ".v_proj." in key}
    config = json.loads((DEMO / "pirate" / "adapter" / "adapter_config.json").read_text())
    config.update(r=4, lora_alpha=config["lora_alpha"] // 2, target_modules=["q_proj", "v_proj"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32) for k, v in kept.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def folder_bytes(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))


def first_token_s(base_url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Describe the sea."}], "temperature": 0,
            "max_tokens": 1, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line.replace(" ", "") \
                    and '"content":""' not in line.replace(" ", ""):
                return time.perf_counter() - start
    raise RuntimeError(f"no token for {model}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _stream(client: openai.AsyncOpenAI, model: str, i: int, tokens: int) -> int:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    produced = 0
    async for chunk in stream:
        if chunk.usage:
            produced = chunk.usage.completion_tokens
    return produced


async def _eight_streams(url: str, tokens: int, fetch_names: list[str]) -> dict:
    """Tokens/s of 8 streams on the config's experts; with `fetch_names`, those are fetched meanwhile (POST
    /v1/route, all at once, 0.3 s after the streams start)."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client, \
            httpx.AsyncClient(timeout=300) as http:
        async def fetch_all():
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            answers = await asyncio.gather(*(http.post(url + "/v1/route", json={
                "model": name, "messages": [{"role": "user", "content": "Hi"}]}) for name in fetch_names))
            return time.perf_counter() - started, [a.status_code for a in answers]

        start = time.perf_counter()
        fetching = asyncio.create_task(fetch_all()) if fetch_names else None
        produced = await asyncio.gather(*(_stream(client, EXPERTS[i % 3], i, tokens) for i in range(8)))
        wall = time.perf_counter() - start
        fetch_s, statuses = await fetching if fetching else (0.0, [])
    return {"tokens_per_s": sum(produced) / wall, "wall_s": wall, "fetch_s": fetch_s, "statuses": statuses}


def retire(url: str, names: list[str]) -> None:
    for name in names:
        httpx.delete(f"{url}/v1/adapters/{name}", headers=ADMIN, timeout=60)


def metric(url: str, name: str, **labels) -> float:
    class _Server:
        base_url = url

    return scrape(_Server()).get((name, tuple(sorted(labels.items()))), 0.0)


def lru_hit_rate(sequence: list[int], room: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for item in sequence:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            cache[item] = None
            if len(cache) > room:
                cache.popitem(last=False)
    return hits / len(sequence)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream in part 2")
    parser.add_argument("--zipf-requests", type=int, default=400)
    parser.add_argument("--bucket-nice", type=int, default=19,
                        help="the S3 server's nice value (it stands for a bucket on other machines)")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_sources.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loraplex-bench-sources-"))
    big, small = stacked_rank16(workdir / "rank16"), small_rank4(workdir / "rank4")
    s3 = S3Server(workdir / "moto.log", nice=args.bucket_nice)
    s3.bucket("adapters")
    first_names = [f"acme/first-{i}" for i in range(args.rounds)]
    load_names = [f"acme/load-{i}" for i in range(10)]
    for name in first_names + load_names:
        s3.put_adapter("adapters", name, big)
    zipf_names = [f"zipf/e{i:03d}" for i in range(200)]
    for name in zipf_names:
        s3.put_adapter("adapters", name, small)
    common = {"admin_key": ["bench"], "fine_tuning": False, "router": "none",
              "adapters": {name: {"path": str(DEMO / name / "adapter")} for name in EXPERTS},
              "adapter_sources": [S3Server.source("bucket", "adapters", ["acme/*", "zipf/*"])]}
    report = {**stamp("loadtests.bench_sources"), "s3_server": f"moto's server mode, nice {args.bucket_nice}",
              "load_average_start": os.getloadavg()[0],
              "rank16_adapter_bytes": folder_bytes(big), "zipf_adapter_bytes": folder_bytes(small)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a run stopped midway keeps what it measured
        report["load_average_end"] = os.getloadavg()[0]
        out.write_text(json.dumps(report, indent=2))

    try:
        # ---- 1 and 2: room for everything ----
        server = ServerProcess(workdir, {**common, "adapter_cache_bytes": 50 * folder_bytes(big)}, env=s3.env()).start()
        try:
            url = server.base_url
            first_token_s(url, "pirate")  # warm-up
            first_token_s(url, "acme/first-0")  # warm-up of the fetch path (boto3's first client); retired below
            retire(url, ["acme/first-0"])
            first_use, normal = [], []
            for name in first_names:
                first_use.append(first_token_s(url, name))
                normal.append(first_token_s(url, first_names[0]))
            report["first_use"] = {
                "first_use_s": {"p50": statistics.median(first_use), "p99": percentile(first_use, 0.99),
                                "runs": first_use},
                "normal_s": {"p50": statistics.median(normal), "p99": percentile(normal, 0.99), "runs": normal},
                "extra_p50_s": statistics.median(first_use) - statistics.median(normal),
            }
            save()
            asyncio.run(_eight_streams(url, 8, []))  # warm-up
            alone, with_fetches = [], []
            for _ in range(args.load_rounds):
                alone.append(asyncio.run(_eight_streams(url, args.tokens, [])))
                with_fetches.append(asyncio.run(_eight_streams(url, args.tokens, load_names)))
                retire(url, load_names)
            ratio = [w["tokens_per_s"] / a["tokens_per_s"] for a, w in zip(alone, with_fetches)]
            report["others_during_fetches"] = {
                "tokens_per_s_alone": statistics.median(a["tokens_per_s"] for a in alone),
                "tokens_per_s_with_fetches": statistics.median(w["tokens_per_s"] for w in with_fetches),
                "ratio_per_round": ratio, "ratio": statistics.median(ratio),
                "fetch_burst_s": statistics.median(w["fetch_s"] for w in with_fetches),
                "streams_wall_s": statistics.median(w["wall_s"] for w in with_fetches),
                "fetch_statuses": sorted({s for w in with_fetches for s in w["statuses"]}),
                "tokens_per_stream": args.tokens,
            }
            save()
        finally:
            server.stop()

        # ---- 3: Zipf(1.1) over 200 names, room for 20 ----
        room = 20 * folder_bytes(small) + folder_bytes(small) // 2
        server = ServerProcess(workdir, {**common, "adapter_cache_bytes": room}, env=s3.env()).start()
        try:
            url = server.base_url
            rng = random.Random(11)
            weights = [1 / (k ** 1.1) for k in range(1, 201)]
            sequence = rng.choices(range(200), weights=weights, k=args.zipf_requests)
            statuses = []

            def one(index: int) -> int:
                return httpx.post(url + "/v1/chat/completions", timeout=300, json={
                    "model": zipf_names[index], "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1}).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(one, sequence))
            wall = time.perf_counter() - started
            hits = metric(url, "loraplex_adapter_cache_hits_total")
            misses = metric(url, "loraplex_adapter_cache_misses_total")
            report["zipf"] = {
                "requests": len(sequence), "distinct_names_requested": len(set(sequence)), "room": 20,
                "hit_rate": hits / max(hits + misses, 1), "hits": hits, "misses": misses,
                "fetches": metric(url, "loraplex_adapter_fetches_total", source="bucket", outcome="fetched"),
                "evictions": metric(url, "loraplex_adapter_cache_evictions_total"),
                "errors": sum(1 for s in statuses if s != 200),
                "statuses": sorted(set(statuses)),
                "exact_lru_hit_rate": lru_hit_rate(sequence, 20),
                "cache_bytes_used": metric(url, "loraplex_adapter_cache_bytes", state="used"),
                "cache_bytes_limit": room, "wall_s": wall,
            }
        finally:
            server.stop()
    finally:
        s3.stop()

    # the machine is shared: how busy it was says how far the absolute times (not the ratios) can be trusted
    save()
    first, others, zipf = report["first_use"], report["others_during_fetches"], report["zipf"]
    print(f"first use -> first token: p50 {first['first_use_s']['p50'] * 1000:.0f} ms, p99 "
          f"{first['first_use_s']['p99'] * 1000:.0f} ms; a fetched expert: p50 {first['normal_s']['p50'] * 1000:.0f} "
          f"ms (extra p50 {first['extra_p50_s'] * 1000:.0f} ms; goal < 1000 ms)")
    print(f"8 streams while 10 adapters are fetched: {others['ratio']:.2f}x their tokens/s alone (goal >= 0.9)")
    print(f"Zipf(1.1), 200 names, room for 20: hit rate {zipf['hit_rate']:.2f} (exact LRU {zipf['exact_lru_hit_rate']:.2f}), "
          f"{zipf['fetches']:.0f} fetches, {zipf['evictions']:.0f} evictions, {zipf['errors']} errors")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
