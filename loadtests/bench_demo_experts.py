"""The shipped demo experts under load, measured from outside (issue 14): what a real expert costs.

    python -m loadtests.bench_demo_experts [--rounds 3] [--tokens 64]

`make bench` uses random rank-16 adapters; this uses what a user runs first: `loraplex serve` on
configs/default.yaml (SmolLM2-135M NF4, float32 compute, the rank-8 experts json-answer, pirate, terse),
driven with the openai client over HTTP, greedy, exactly --tokens tokens per request (ignore_eos).

1. Eight concurrent streamed requests: all on the base; all eight on `pirate`; the three experts mixed
   (3/3/2). Output tokens/s of the whole load; the three loads alternate --rounds times, medians kept.
2. One stream at a time (four requests each): the median gap between streamed tokens on the base and on
   `pirate`; base gap / expert gap is the expert's speed relative to the base.
Writes loadtests/results/bench_demo_experts.json (--no-batch-invariance: the same with
`batch_invariant: false`, to bench_demo_experts_not_invariant.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from tests.support.harness import REPO, ServerProcess
from loadtests.provenance import stamp

QUESTIONS = ["Explain how a rainbow forms.", "Describe a busy market.", "What makes bread rise?",
             "Tell me about the moon.", "How do bees make honey?", "Why do we sleep?", "What is a volcano?",
             "Describe a walk in the forest."]
EXPERTS = ("json-answer", "pirate", "terse")


async def _stream(client: openai.AsyncOpenAI, model: str, i: int, tokens: int) -> dict:
    times: list[float] = []
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    produced = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            produced = chunk.usage.completion_tokens
    return {"tokens": produced, "start": start, "times": times}


async def _concurrent(url: str, models: list[str], tokens: int) -> float:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, m, i, tokens) for i, m in enumerate(models)))
        wall = time.perf_counter() - start
    return sum(r["tokens"] for r in results) / wall


async def _gaps(url: str, model: str, tokens: int, requests: int) -> float:
    """Median gap between streamed tokens over `requests` requests sent one at a time, in ms."""
    gaps: list[float] = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        for i in range(requests):
            times = (await _stream(client, model, i, tokens))["times"]
            gaps += [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-batch-invariance", action="store_true",
                        help="serve with batch_invariant: false (results to bench_demo_experts_not_invariant.json)")
    args = parser.parse_args(argv)
    loads = {"base": None, "one_expert": ["pirate"] * 8, "three_mixed": [EXPERTS[i % 3] for i in range(8)]}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"LORAPLEX_BATCH_INVARIANT": "false"} if args.no_batch_invariance else {}
        server = ServerProcess(Path(tmp), None, env=env).start()  # no --config: configs/default.yaml
        try:
            base = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
            loads["base"] = [base] * 8
            asyncio.run(_concurrent(server.base_url, loads["three_mixed"], 4))  # warm-up: experts resident
            runs: dict[str, list[float]] = {name: [] for name in loads}
            for _ in range(args.rounds):  # alternated: this machine drifts within minutes
                for name, models in loads.items():
                    runs[name].append(asyncio.run(_concurrent(server.base_url, models, args.tokens)))
            gaps = {"base": [], "pirate": []}
            for _ in range(args.rounds):
                for name, model in (("base", base), ("pirate", "pirate")):
                    gaps[name].append(asyncio.run(_gaps(server.base_url, model, args.tokens, 4)))
        finally:
            server.stop()
    tokens_per_s = {name: round(statistics.median(values), 1) for name, values in runs.items()}
    gap_ms = {name: round(statistics.median(values), 1) for name, values in gaps.items()}
    result = {**stamp("loadtests.bench_demo_experts", argv), "tokens": args.tokens, "rounds": args.rounds,
              "batch_invariant": not args.no_batch_invariance,
              "concurrent_8": {"tokens_per_s": tokens_per_s, "runs": runs,
                               "one_expert_vs_base": round(tokens_per_s["one_expert"] / tokens_per_s["base"], 3),
                               "three_mixed_vs_base": round(tokens_per_s["three_mixed"] / tokens_per_s["base"], 3)},
              "single_stream": {"inter_token_ms": gap_ms, "runs": gaps,
                                "expert_vs_base": round(gap_ms["base"] / gap_ms["pirate"], 3)}}
    name = "bench_demo_experts_not_invariant.json" if args.no_batch_invariance else "bench_demo_experts.json"
    out = REPO / "loadtests" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
