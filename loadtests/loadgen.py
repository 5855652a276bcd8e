"""Async load generator for an OpenAI-compatible chat server on loopback (loraplex or a baseline).

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --scenario steady --models a,b,base \\
        --concurrency 8 --requests 64 --max-tokens 64 [--stream] [--out results.json]

Scenarios: `steady` (a fixed number of clients, each sending its next request when the last
ends), `burst` (every request at once), `long` (steady, with ~1k-token prompts), `auto`
(steady, model "auto": router traffic). Bounded: at most --requests requests and --duration
seconds. Reports requests/s, output tokens/s, TTFT, inter-token and end-to-end latency
p50/p90/p99, errors by status, overall and per model, as JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about the sea.", "What are the benefits of exercise?",
    "Describe the city of Paris.", "How do computers store numbers?", "Give three tips for better sleep.",
    "Summarize: The town of Oakdale opened a new library on Monday. It has three floors.",
    "What is the capital of Japan?",
]
LONG_PROMPT = "Read this and answer briefly at the end. " + " ".join(
    f"Paragraph {i}: the committee reviewed the budget, the schedule and the list of open questions." for i in range(60)
)


@dataclass
class RequestResult:
    model: str
    status: int  # HTTP status; 0 when the connection failed
    start: float
    end: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed content chunk
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _spread(values: list[float]) -> dict:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def summarize(results: list[RequestResult]) -> dict:
    """Throughput and latency over the run's wall time (first start to last end)."""
    if not results:
        return {"requests": 0}
    wall = max(r.end for r in results) - min(r.start for r in results)
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors_by_status": errors,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "output_tokens": tokens,
        "ttft_s": _spread([r.first_token - r.start for r in ok if r.first_token is not None]),
        "inter_token_s": _spread(gaps),
        "e2e_s": _spread([r.end - r.start for r in ok]),
    }


def report(results: list[RequestResult]) -> dict:
    models = sorted({r.model for r in results})
    return {"overall": summarize(results), "per_model": {m: summarize([r for r in results if r.model == m])
                                                           for m in models}}


def markdown(summary: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value * 1000:.0f}"

    rows = ["| model | requests | req/s | tok/s | TTFT p50/p99 ms | inter-token p50/p99 ms | e2e p50/p99 ms | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in [("all", summary["overall"]), *summary["per_model"].items()]:
        rows.append(
            f"| {name} | {s['requests']} | {s['requests_per_s'] or 0:.2f} | {s['output_tokens_per_s'] or 0:.1f} | "
            f"{ms(s['ttft_s']['p50'])}/{ms(s['ttft_s']['p99'])} | {ms(s['inter_token_s']['p50'])}/"
            f"{ms(s['inter_token_s']['p99'])} | {ms(s['e2e_s']['p50'])}/{ms(s['e2e_s']['p99'])} | "
            f"{sum(s['errors_by_status'].values())} |")
    return "\n".join(rows)


def check_loopback(url: str) -> None:
    """Load only ever goes to this machine: localhost or a loopback address."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing {url}: load tests only target loopback addresses")


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    result = RequestResult(model, 0, time.perf_counter(), 0.0)
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            result.status = response.status_code
            if response.status_code == 200:
                result.completion_tokens = response.json()["usage"]["completion_tokens"]
                result.first_token = time.perf_counter()
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                result.status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        now = time.perf_counter()
                        result.first_token = result.first_token or now
                        result.token_times.append(now)
                    if chunk.get("usage"):
                        result.completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        result.status = 0
    result.end = time.perf_counter()
    return result


async def run(url: str, scenario: str, models: list[str], concurrency: int, requests: int, max_tokens: int,
              stream: bool, duration_s: float) -> list[RequestResult]:
    check_loopback(url)
    prompts = [LONG_PROMPT] if scenario == "long" else PROMPTS
    models = ["auto"] if scenario == "auto" else models
    jobs = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(requests)]
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=max(concurrency, requests if scenario == "burst" else concurrency))
    async with httpx.AsyncClient(base_url=url, timeout=duration_s + 60, limits=limits) as client:
        if scenario == "burst":
            return list(await asyncio.gather(*(one_request(client, m, p, max_tokens, stream) for m, p in jobs)))
        queue = list(reversed(jobs))
        results: list[RequestResult] = []

        async def worker():
            while queue and time.perf_counter() < deadline:
                model, prompt = queue.pop()
                results.append(await one_request(client, model, prompt, max_tokens, stream))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--scenario", choices=["steady", "burst", "long", "auto"], default="steady")
    parser.add_argument("--models", required=True, help="comma-separated model / expert names, round-robin")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--duration", type=float, default=300, help="stop sending after this many seconds")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    results = asyncio.run(run(args.url, args.scenario, args.models.split(","), args.concurrency, args.requests,
                              args.max_tokens, args.stream, args.duration))
    summary = {"scenario": args.scenario, "concurrency": args.concurrency, "stream": args.stream, **report(results)}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({**summary, "raw": [asdict(r) for r in results]}, handle, indent=2)
    print(markdown(summary))


if __name__ == "__main__":
    main()
