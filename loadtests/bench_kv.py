"""KV cache benchmark (issue 13): chunked prefill, prefix caching, memory that follows tokens.

    python -m loadtests.bench_kv [--long-prompts 3] [--streams 8]

Runs the real server (default SmolLM2, NF4, float32 compute) in several configurations, in one run:
  1. Long prompts (~1,000-2,000 tokens, distinct) arriving one after another while `--streams` streams
     decode: the streams' inter-token gaps (p50, p99, max) and the total tokens processed per second,
     with chunked prefill (the default max_step_tokens) against one-shot prefill (max_step_tokens 8192:
     a whole prompt in one forward pass, what the engine did before).
  2. 16 requests sharing a ~1,000-token system prompt, two at a time: median time to first token with
     prefix caching on against off.
  3. 64 concurrent short requests with max_batch_size 64 and a KV budget of 4 full-context requests
     (what the old per-slot layout could give to 4 slots), against max_batch_size 4 in the same budget:
     all complete, how many ran at once, peak KV in use, output tokens/s.
Peak KV bytes in use (from /metrics, polled) are reported for every scenario.
Writes loadtests/results/bench_kv.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.support.harness import REPO, ServerProcess, run_together
from loadtests.loadgen import percentile
from loadtests.provenance import stamp
from server.settings import Settings

BASE = "SmolLM2-135M-Instruct"
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "river garden market bridge winter summer music engine signal forest island ocean mountain letter").split()
CONTEXT = 2048


def text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def scrape(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("loraplex_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


class KVPeak:
    """Polls /metrics while a scenario runs: the most KV bytes and requests running at once."""

    def __init__(self, base_url: str):
        self.base_url, self.bytes, self.running = base_url, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            values = scrape(self.base_url)
            self.bytes = max(self.bytes, values.get("loraplex_kv_cache_used_bytes", 0.0))
            self.running = max(self.running, values.get("loraplex_requests_running", 0.0))

    def __enter__(self) -> "KVPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def chat_messages(base_url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: {times: each content chunk's arrival, ttft_s, usage}."""
    body = {"model": BASE, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    record: dict = {}
    start = time.perf_counter()
    times = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                record["usage"] = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    record["times"] = times
    record["ttft_s"] = times[0] - start if times else None
    return record


def stream(base_url: str, content: str, max_tokens: int, record: dict) -> None:
    """One user message, streamed; fills `record` (a thread's result)."""
    record.update(chat_messages(base_url, [{"role": "user", "content": content}], max_tokens))


def long_prompts_while_streaming(base_url: str, streams: int, long_prompts: int, stream_tokens: int,
                                 seed: int = 1000) -> dict:
    """`seed` picks the long prompts' text: give every run its own, or the prefix cache answers them."""
    records = [{} for _ in range(streams)]
    threads = [threading.Thread(target=stream, args=(base_url, f"Tell story number {i} about the sea.",
                                                     stream_tokens, records[i])) for i in range(streams)]
    long_records = []
    with KVPeak(base_url) as peak:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # the streams are decoding
        long_sent = time.perf_counter()
        for i in range(long_prompts):
            words = 800 + 350 * (i % 3)  # ~1,000-1,900 tokens
            record: dict = {}
            stream(base_url, text(words, seed=seed + i) + "\nSummarize.", 4, record)
            long_records.append(record)
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    gaps = [(b - a) * 1000 for r in records for a, b in zip(r["times"], r["times"][1:])]
    # the streams' usual pace: gaps that ended before the first long prompt was sent
    quiet = [(b - a) * 1000 for r in records for a, b in zip(r["times"], r["times"][1:]) if b < long_sent]
    tokens = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in records + long_records)
    return {
        "streams": streams, "stream_tokens": stream_tokens,
        "long_prompt_tokens": [r["usage"]["prompt_tokens"] for r in long_records],
        "long_prompt_ttft_s": [round(r["ttft_s"], 3) for r in long_records],
        "gap_p50_ms": round(percentile(gaps, 50), 1), "gap_p99_ms": round(percentile(gaps, 99), 1),
        "gap_max_ms": round(max(gaps), 1), "p99_over_p50": round(percentile(gaps, 99) / percentile(gaps, 50), 2),
        "quiet_gap_p50_ms": round(percentile(quiet, 50), 1),
        "p99_over_quiet_p50": round(percentile(gaps, 99) / percentile(quiet, 50), 2),
        "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "peak_kv_mib": round(peak.bytes / 2**20, 1),
    }


def shared_system_prompt(base_url: str, requests: int, concurrency: int) -> dict:
    system = "You are a careful assistant. Context follows. " + text(780, seed=7)
    records: list[dict] = [{} for _ in range(requests)]

    def worker(indices):
        for i in indices:
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": f"Question {i}: which word comes up most often?"}]
            records[i] = chat_messages(base_url, messages, 8)

    with KVPeak(base_url) as peak:
        run_together([threading.Thread(target=worker, args=(range(c, requests, concurrency),))
                      for c in range(concurrency)])
    ttfts = [r["ttft_s"] for r in records]
    return {
        "requests": requests, "concurrency": concurrency, "prompt_tokens": records[0]["usage"]["prompt_tokens"],
        "median_ttft_s": round(statistics.median(ttfts), 3),
        "cached_tokens": [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in records],
        "peak_kv_mib": round(peak.bytes / 2**20, 1),
    }


def many_short(base_url: str, requests: int, max_tokens: int) -> dict:
    records: list[dict] = [{} for _ in range(requests)]
    threads = [threading.Thread(target=lambda i=i: records.__setitem__(
        i, chat_messages(base_url, [{"role": "user", "content": f"Write line {i} of a poem."}], max_tokens)))
        for i in range(requests)]
    with KVPeak(base_url) as peak:
        wall = run_together(threads)
    completed = sum(1 for r in records if r.get("usage", {}).get("completion_tokens") == max_tokens)
    return {"requests": requests, "completed": completed, "max_tokens": max_tokens,
            "output_tokens_per_s": round(completed * max_tokens / wall, 1), "wall_s": round(wall, 2),
            "peak_running": int(peak.running), "peak_kv_mib": round(peak.bytes / 2**20, 1)}


def serve(workdir: Path, **settings) -> ServerProcess:
    config = {"compute_dtype": "float32", "router": "none", **settings}
    return ServerProcess(workdir, config).start()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompts", type=int, default=3)
    parser.add_argument("--stream-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the long-prompt scenario")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "bench_kv.json")
    args = parser.parse_args(argv)
    result: dict = {**stamp("loadtests.bench_kv", argv), "long_prompts": {}, "shared_prefix": {}, "short_requests": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # one-shot: a whole prompt in one forward pass, as the engine did before chunked prefill
        runs = {"chunked": {}, "one_shot": {"max_step_tokens": 8192, "max_step_slowdown": 0}}
        servers = {name: serve(workdir, **settings) for name, settings in runs.items()}  # both up, used in turn
        try:
            rounds: dict[str, list[dict]] = {name: [] for name in runs}
            for round_ in range(args.rounds):  # alternated: this machine's speed drifts
                for index, (name, server) in enumerate(servers.items()):
                    rounds[name].append(long_prompts_while_streaming(
                        server.base_url, args.streams, args.long_prompts, args.stream_tokens,
                        seed=1000 + 100 * round_ + 10 * index))
                    print(name, rounds[name][-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
        for name, runs_of in rounds.items():
            median = {key: statistics.median(run[key] for run in runs_of) for key, value in runs_of[0].items()
                      if isinstance(value, (int, float))}
            result["long_prompts"][name] = {**runs_of[0], **median, "rounds": runs_of,
                                            "max_step_tokens": runs[name].get("max_step_tokens",
                                                                              Settings().max_step_tokens),
                                            "max_step_slowdown": runs[name].get("max_step_slowdown",
                                                                                Settings().max_step_slowdown)}
        for name, caching in (("on", True), ("off", False)):
            server = serve(workdir, prefix_caching=caching)
            try:
                result["shared_prefix"][name] = shared_system_prompt(server.base_url, 16, 2)
                print("prefix", name, result["shared_prefix"][name], flush=True)
            finally:
                server.stop()
        budget = 4 * CONTEXT  # tokens: four full-context requests, and the padding block
        budget_bytes = (budget // 16 + 1) * _block_bytes()
        for name, batch in (("batch64", 64), ("batch4", 4)):
            server = serve(workdir, max_batch_size=batch, kv_cache_memory=str(budget_bytes))
            try:
                result["short_requests"][name] = {**many_short(server.base_url, 64, 48), "max_batch_size": batch,
                                                  "kv_budget_tokens": budget}
                print(name, result["short_requests"][name], flush=True)
            finally:
                server.stop()
    chunked, one_shot = result["long_prompts"]["chunked"], result["long_prompts"]["one_shot"]
    result["ratios"] = {
        "chunked_p99_over_p50": chunked["p99_over_p50"], "one_shot_p99_over_p50": one_shot["p99_over_p50"],
        "throughput_chunked_over_one_shot": round(chunked["tokens_per_s"] / one_shot["tokens_per_s"], 3),
        "ttft_prefix_off_over_on": round(result["shared_prefix"]["off"]["median_ttft_s"]
                                         / result["shared_prefix"]["on"]["median_ttft_s"], 2),
        "short_batch64_over_batch4": round(result["short_requests"]["batch64"]["output_tokens_per_s"]
                                           / result["short_requests"]["batch4"]["output_tokens_per_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return result


def _block_bytes() -> int:
    """Bytes of one 16-token KV block of the default base in float32."""
    import torch
    from transformers import AutoConfig

    from models.base_model import convert_embedded
    from server.engine.model_runner import kv_block_bytes

    return kv_block_bytes(AutoConfig.from_pretrained(convert_embedded(Settings().cache_dir)), torch.float32, 16)


if __name__ == "__main__":
    main()
