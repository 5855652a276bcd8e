"""Batch API and Responses API benchmark (issue 36).

    python -m loadtests.bench_batches [--lines 2000] [--streams 8] [--rounds 2] [--overhead-requests 20]

On the default server (configs/default.yaml: SmolLM2, the demo experts), started here as a user runs it:

1. Interactive streams with and without a batch. `--streams` clients each stream `--requests` chat
   completions of `--tokens` tokens (ignore_eos, so every request decodes the same count), one after
   another; a stream's tokens/s is its tokens over its elapsed time, and its TTFT is the median of its
   requests'. Measured alone, then while a `--lines` batch (chat lines of `--batch-tokens` tokens,
   ignore_eos, on the base and the demo experts) runs, then alone again, `--rounds` times; the batch is
   created once and cancelled at the end. The issue asks the streams to keep >= 0.9x their tokens/s
   without the batch: the ratio is together / the mean of the alone runs around it.
2. The batch's tokens/s: alone (over `--window` s with no other request) and while the streams run,
   from its request_counts.completed (every line decodes exactly `--batch-tokens` tokens).
3. Responses API overhead: the same request (greedy, the same prompt, `--overhead-tokens` tokens) over
   /v1/chat/completions and /v1/responses, streamed, alternated `--overhead-requests` times; medians
   of time to first token and total time, and the ratios responses / chat (the issue asks <= 1.05x).

Writes loadtests/results/bench_batches.json. Figures measured while other work runs on the machine are
noisy: run it alone.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess

BASE = "SmolLM2-135M-Instruct"
BATCH_MODELS = (BASE, "pirate", "terse")  # the base and two demo experts of configs/default.yaml
RESULT = REPO / "loadtests" / "results" / "bench_batches.json"


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def _chat_stream(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(time to first content token, total time, completion tokens) of one streamed chat completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


async def _responses_stream(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """The same for a streamed response (first `response.output_text.delta`, tokens from the final usage)."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if first is None and event["type"] == "response.output_text.delta" and event["delta"]:
                first = time.perf_counter() - start
            if event["type"] in ("response.completed", "response.incomplete"):
                tokens = event["response"]["usage"]["output_tokens"]
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


async def _streams(base_url: str, streams: int, requests: int, tokens: int) -> dict:
    """`streams` clients, each `requests` chat completions one after another: tokens/s and TTFT per stream."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(index: int) -> dict:
            start, total, ttfts = time.perf_counter(), 0, []
            for number in range(requests):
                ttft, _, count = await _chat_stream(client, {
                    "model": BASE, "messages": _messages(f"Stream {index}, request {number}: tell me a story."),
                    "max_tokens": tokens, "ignore_eos": True, "temperature": 0})
                total += count
                ttfts.append(ttft)
            return {"tokens_per_s": total / (time.perf_counter() - start), "ttft_s": statistics.median(ttfts)}

        runs = await asyncio.gather(*(one(i) for i in range(streams)))
    rates = [r["tokens_per_s"] for r in runs]
    return {"stream_tokens_per_s_median": statistics.median(rates), "stream_tokens_per_s_min": min(rates),
            "all_streams_tokens_per_s": sum(rates), "ttft_s_median": statistics.median(r["ttft_s"] for r in runs)}


def _completed(client: openai.OpenAI, batch_id: str) -> tuple[int, str]:
    batch = client.batches.retrieve(batch_id)
    return batch.request_counts.completed, batch.status


def _batch_rate(client: openai.OpenAI, batch_id: str, seconds: float, batch_tokens: int) -> float:
    """The batch's tokens/s over the next `seconds` (lines completed x tokens a line)."""
    before, _ = _completed(client, batch_id)
    start = time.perf_counter()
    time.sleep(seconds)
    after, _ = _completed(client, batch_id)
    return (after - before) * batch_tokens / (time.perf_counter() - start)


def _create_batch(client: openai.OpenAI, lines: int, batch_tokens: int) -> str:
    rows = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": BATCH_MODELS[i % len(BATCH_MODELS)], "messages": _messages(f"Item {i}: describe it briefly."),
        "max_tokens": batch_tokens, "ignore_eos": True, "temperature": 0}}) for i in range(lines)]
    uploaded = client.files.create(file=("bench.jsonl", io.BytesIO("\n".join(rows).encode())), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def _interference(server: ServerProcess, args) -> dict:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def streams() -> tuple[dict, float]:
        start = time.perf_counter()
        result = asyncio.run(_streams(server.base_url, args.streams, args.requests, args.tokens))
        return result, time.perf_counter() - start

    asyncio.run(_streams(server.base_url, args.streams, 1, 8))  # warm-up
    rounds = []
    alone_before, _ = streams()
    batch_id = _create_batch(client, args.lines, args.batch_tokens)
    time.sleep(args.window / 2)  # the batch fills the rows
    for _ in range(args.rounds):
        batch_alone = _batch_rate(client, batch_id, args.window, args.batch_tokens)
        done_before, _ = _completed(client, batch_id)
        together, seconds = streams()
        done_after, status = _completed(client, batch_id)
        if status != "in_progress":
            raise SystemExit(f"the batch is {status} before the round ended: give it more --lines")
        rounds.append({"alone_before": alone_before, "together": together,
                       "batch_alone_tokens_per_s": batch_alone,
                       "batch_with_streams_tokens_per_s": (done_after - done_before) * args.batch_tokens / seconds})
        alone_before = None  # no run without the batch between rounds: the batch cannot pause
    client.batches.cancel(batch_id)
    while _completed(client, batch_id)[1] not in ("cancelled", "completed", "failed"):
        time.sleep(0.5)
    alone_after, _ = streams()
    alone = [r["alone_before"] for r in rounds if r["alone_before"]] + [alone_after]
    alone_rate = statistics.mean(a["stream_tokens_per_s_median"] for a in alone)
    alone_ttft = statistics.mean(a["ttft_s_median"] for a in alone)
    together_rate = statistics.median(r["together"]["stream_tokens_per_s_median"] for r in rounds)
    return {
        "rounds": rounds, "alone_after": alone_after,
        "stream_tokens_per_s_alone": alone_rate, "stream_tokens_per_s_with_batch": together_rate,
        "stream_ratio_with_batch": together_rate / alone_rate,
        "ttft_s_alone": alone_ttft,
        "ttft_s_with_batch": statistics.median(r["together"]["ttft_s_median"] for r in rounds),
        "batch_alone_tokens_per_s": statistics.median(r["batch_alone_tokens_per_s"] for r in rounds),
        "batch_with_streams_tokens_per_s": statistics.median(r["batch_with_streams_tokens_per_s"] for r in rounds),
    }


def _overhead(server: ServerProcess, requests: int, tokens: int) -> dict:
    prompt = "Explain in a few sentences why the sky is blue."

    async def run() -> dict:
        samples = {"chat": [], "responses": []}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            for number in range(requests + 1):
                order = ("chat", "responses") if number % 2 == 0 else ("responses", "chat")
                for kind in order:
                    if kind == "chat":
                        sample = await _chat_stream(client, {"model": BASE, "messages": _messages(prompt),
                                                             "max_tokens": tokens, "temperature": 0})
                    else:
                        sample = await _responses_stream(client, {"model": BASE, "input": prompt, "store": False,
                                                                  "max_output_tokens": tokens, "temperature": 0})
                    if number:  # the first pair warms up
                        samples[kind].append(sample)
        return samples

    samples = asyncio.run(run())
    out = {}
    for kind, rows in samples.items():
        out[kind] = {"ttft_s_median": statistics.median(r[0] for r in rows),
                     "total_s_median": statistics.median(r[1] for r in rows),
                     "tokens": sorted({r[2] for r in rows})}
    out["ttft_ratio"] = out["responses"]["ttft_s_median"] / out["chat"]["ttft_s_median"]
    out["total_ratio"] = out["responses"]["total_s_median"] / out["chat"]["total_s_median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000, help="batch lines (the batch must outlast the rounds)")
    parser.add_argument("--batch-tokens", type=int, default=64, help="tokens each batch line decodes")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests each stream makes in a run")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each interactive request decodes")
    parser.add_argument("--window", type=float, default=20.0, help="seconds the batch's alone rate is measured")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overhead-requests", type=int, default=20)
    parser.add_argument("--overhead-tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print the results, do not write the result file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = ServerProcess(Path(workdir), None).start(timeout=600)  # configs/default.yaml, as a user runs it
        try:
            overhead = _overhead(server, args.overhead_requests, args.overhead_tokens)
            print(json.dumps({"responses_overhead": overhead}, indent=2), flush=True)
            interference = _interference(server, args)
        finally:
            server.stop()
    result = {**stamp("loadtests.bench_batches"), "settings": vars(args), "responses_overhead": overhead,
              "batch_interference": interference}
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
