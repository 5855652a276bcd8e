"""Edge benchmark (issue 20): what large or unauthenticated requests cost everyone else.

    python -m loadtests.bench_edge [--clients 6]

On the default SmolLM2 (context window 2048):
  1. /health latency (p50 / max over continuous polling on one connection) when idle, and while
     `--clients` clients each send `--rounds` chat requests with a ~900 kB prompt (refused by the character
     bound before tokenizing) and a ~150 kB prompt (tokenized in a worker thread, then refused);
     the issue measured up to 850 ms (2.5 s with "auto") before tokenizing moved off the event loop;
  2. the server's peak resident memory while `--clients` clients each POST 200 MB to
     /v1/adapters without a key (the issue measured +1.3 GB when bodies were read before the key).
Writes loadtests/results/bench_edge.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.support.harness import REPO, ServerProcess
from loadtests.provenance import stamp

BASE = "SmolLM2-135M-Instruct"


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def _poll_health(base_url: str, busy) -> dict:
    """Latency of /health on one kept-alive connection, every 5 ms, while busy() is true."""
    latencies = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while busy():
            start = time.perf_counter()
            client.get("/health").raise_for_status()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.005)
    latencies.sort()
    return {"p50_ms": round(statistics.median(latencies) * 1000, 2), "max_ms": round(latencies[-1] * 1000, 2),
            "samples": len(latencies)}


def _in_parallel(clients: int, work) -> list[threading.Thread]:
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def health_under_large_prompts(server: ServerProcess, clients: int, rounds: int, chars: int, model: str) -> dict:
    prompt = "word " * (chars // 5)
    statuses = []

    def send():  # one client: `rounds` requests, one after the other
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
        with httpx.Client(timeout=300) as client:
            for _ in range(rounds):
                statuses.append(client.post(server.base_url + "/v1/chat/completions", json=body).status_code)

    threads = _in_parallel(clients, send)
    start = time.perf_counter()
    latency = _poll_health(server.base_url, lambda: any(t.is_alive() for t in threads))
    return {"prompt_chars": len(prompt), "model": model, "clients": clients, "rounds": rounds,
            "statuses": sorted(set(statuses)),
            "wall_s": round(time.perf_counter() - start, 2), "health": latency}


def unauthenticated_uploads(server: ServerProcess, clients: int, megabytes: int = 200) -> dict:
    statuses, chunk = [], b"\0" * (1 << 20)

    def body():
        for _ in range(megabytes):
            yield chunk

    def send():
        try:
            response = httpx.post(server.base_url + "/v1/adapters", content=body(), timeout=120,
                                  headers={"content-type": "multipart/form-data; boundary=x",
                                           "content-length": str(megabytes << 20)})
            statuses.append(response.status_code)
        except httpx.HTTPError as exc:  # the server may close the connection after its 401
            statuses.append(type(exc).__name__)

    before = _rss_bytes(server.proc.pid)
    threads = _in_parallel(clients, send)
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, _rss_bytes(server.proc.pid))
        time.sleep(0.01)
    return {"clients": clients, "megabytes_each": megabytes, "statuses": sorted(set(map(str, statuses))),
            "rss_before_mb": round(before / 2**20), "rss_peak_mb": round(peak / 2**20),
            "rss_growth_mb": round((peak - before) / 2**20)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5, help="requests per client, one after the other")
    args = parser.parse_args(argv)
    result = {**stamp("loadtests.bench_edge", argv), "clients": args.clients}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), {"compute_dtype": "float32", "max_request_bytes": 2_000_000},
                               env={"LORAPLEX_ADMIN_KEY": "bench"}).start()
        try:
            assert httpx.post(server.base_url + "/v1/route", json={"messages": [{"role": "user", "content": "x"}]},
                              timeout=60).status_code == 200  # the router's encoder is loaded
            idle_until = time.perf_counter() + 3
            result["health_idle"] = _poll_health(server.base_url, lambda: time.perf_counter() < idle_until)
            result["large_prompts"] = [health_under_large_prompts(server, args.clients, args.rounds, chars, model)
                                       for chars in (900_000, 150_000) for model in (BASE, "auto")]
            result["unauthenticated_uploads"] = unauthenticated_uploads(server, args.clients)
            result["server_alive"] = server.proc.poll() is None
        finally:
            server.stop()
    out = REPO / "loadtests" / "results" / "bench_edge.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
