"""What sampling costs a served load, measured from outside: sampled requests against greedy ones.

    python -m loadtests.bench_sampled [--rounds 3] [--tokens 64] [--concurrency 16] [--out bench_sampled.json]

Every other benchmark here is greedy, but an OpenAI client that sends no temperature gets 1.0: each of
its tokens is drawn from the whole distribution. This serves configs/default.yaml (SmolLM2-135M NF4,
float32 compute) and sends --concurrency streamed requests of exactly --tokens tokens (ignore_eos) to the
base with the openai client, three ways: greedy (temperature 0); the client's default (no temperature
sent); temperature 0.8 with top_p 0.9. Output tokens/s of each load, alternated --rounds times, medians
kept; each sampled load as a ratio of the greedy one in the same run. Writes loadtests/results/--out,
with the commit the engine came from (bench_sampled_before.json: the engine before the sampler's CPU
work, run from a worktree of that commit with this script copied in).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai

from loadtests.bench_demo_experts import QUESTIONS
from tests.support.harness import REPO, ServerProcess
from loadtests.provenance import stamp

LOADS = {"greedy": {"temperature": 0}, "client_default": {}, "top_p_0.9": {"temperature": 0.8, "top_p": 0.9}}


async def _stream(client: openai.AsyncOpenAI, model: str, i: int, tokens: int, sampling: dict) -> int:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **sampling)
    produced = 0
    async for chunk in stream:
        if chunk.usage:
            produced = chunk.usage.completion_tokens
    return produced


async def _load(url: str, model: str, concurrency: int, tokens: int, sampling: dict) -> float:
    """Output tokens/s of `concurrency` requests sent at once."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        produced = await asyncio.gather(*(_stream(client, model, i, tokens, sampling) for i in range(concurrency)))
        wall = time.perf_counter() - start
    return sum(produced) / wall


def engine_commit() -> str:
    """The commit the served engine came from (a run against an older engine is a worktree of that commit
    with this script copied in), "+changes" when the tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "server", "adapters", "models", "configs")
    return commit + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default="bench_sampled.json", help="result file name under loadtests/results/")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), None).start()  # no --config: configs/default.yaml
        try:
            base = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(_load(server.base_url, base, args.concurrency, 4, {}))  # warm-up
            runs: dict[str, list[float]] = {name: [] for name in LOADS}
            for _ in range(args.rounds):  # alternated: this machine drifts within minutes
                for name, sampling in LOADS.items():
                    runs[name].append(asyncio.run(_load(server.base_url, base, args.concurrency, args.tokens,
                                                        sampling)))
        finally:
            server.stop()
    tokens_per_s = {name: round(statistics.median(values), 1) for name, values in runs.items()}
    result = {**stamp("loadtests.bench_sampled", argv), "engine_commit": engine_commit(), "tokens": args.tokens,
              "rounds": args.rounds, "concurrency": args.concurrency, "loads": LOADS, "tokens_per_s": tokens_per_s, "runs": runs,
              "vs_greedy": {name: round(tokens_per_s[name] / tokens_per_s["greedy"], 3)
                            for name in LOADS if name != "greedy"}}
    out = REPO / "loadtests" / "results" / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
