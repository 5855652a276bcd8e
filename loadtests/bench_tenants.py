"""Tenants (issue 34): what authentication and the limit check cost a request, and whether one tenant's flood
starves another.

    python -m loadtests.bench_tenants --auth                  # micro-benchmark, seconds, no server
    python -m loadtests.bench_tenants --fairness [--rounds 40] # the real server, minutes

1. --auth: a database of 1,000 tenants and 10,000 keys (`server/tenants/store.py`); what the auth middleware
   runs for a tenant's generation request before its body is read (the key resolved to its tenant, the path's
   refusal check, the limiter's admit and release), timed per call over --calls calls spread over 200 keys
   already seen by this process (the steady state: one scrypt per key per process, then a digest compared),
   p50 and p99; and the first check of a key (scrypt), p50. 9,800 of the 10,000 rows carry the hash of a key
   made once (issuing each with scrypt would take ~12 minutes); the 200 keys measured are issued for real.
2. --fairness: the real server (`loraplex serve`, configs/default.yaml: SmolLM2 NF4 and the demo experts, tenants on,
   batches of 8). Tenant B sends --rounds streamed requests one after another and measures its time to first
   token (the first chunk with text, not the opening chunk the server sends at once), on an idle server, then
   while tenant A keeps 4x its concurrent limit (max_concurrent 2: 8 clients, each reading its 16-token
   stream to the end and sending the next) in flight; p99 of each and their ratio (goal <= 2x). How A's
   clients take a 429 (`--flood`): `sdk` waits the `Retry-After` the server sends (1 s for the concurrency
   limit), as the openai SDK does between its retries; `hammer` ignores it and retries 50 ms later, so
   A's refused requests (~100 a second) and the clients sending them take CPU from the same 2 cores the
   server runs on. Stored as `fairness` and `fairness_hammer`.
Writes (merges into) loadtests/results/bench_tenants.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx

from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess

RESULT = REPO / "loadtests" / "results" / "bench_tenants.json"
ADMIN_KEY = "bench-admin"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_auth(calls: int, tenants: int = 1000, keys: int = 10_000, measured_keys: int = 200) -> dict:
    import sqlite3

    from server.api.auth import TenantAuth
    from server.settings import Settings
    from server.tenants.limits import TenantLimiter
    from server.tenants.store import Limits, TenantStore

    folder = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    store = TenantStore(folder)
    limits = Limits(requests_per_minute=10**9, tokens_per_minute=10**9, max_concurrent=1000)
    made = [store.create_tenant(f"t{i}", limits) for i in range(tenants)]
    real = [store.issue_key(made[i % tenants].id)[1] for i in range(measured_keys)]
    salt, digest = sqlite3.connect(folder / "tenants.sqlite3").execute("SELECT salt, hash FROM keys").fetchone()
    with sqlite3.connect(folder / "tenants.sqlite3") as db:  # the rest of the 10,000 rows
        db.executemany("INSERT INTO keys (id, tenant_id, salt, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                       [(f"{n:012x}", made[n % tenants].id, salt, digest, 0) for n in range(keys - measured_keys)])
    auth = TenantAuth(Settings(tenants=True, admin_key=["admin"], data_dir=str(folder)), store)
    limiter = TenantLimiter()
    first = []
    for key in real:
        started = time.perf_counter()
        assert auth.principal(key) is not None
        first.append(time.perf_counter() - started)
    rng = random.Random(0)
    timings = []
    for _ in range(calls):
        key = rng.choice(real)
        started = time.perf_counter()
        principal, tenant = auth.principal(key)
        assert auth.refusal("/v1/chat/completions", principal) is None
        verdict = limiter.admit(tenant.id, tenant.limits)
        limiter.release(tenant.id)
        timings.append(time.perf_counter() - started)
        assert verdict.refused is None
    store.close()
    return {"tenants": tenants, "keys": keys, "keys_measured": measured_keys, "calls": calls,
            "p50_ms": statistics.median(timings) * 1000, "p99_ms": _pct(timings, 0.99) * 1000,
            "max_ms": max(timings) * 1000, "first_check_p50_ms": statistics.median(first) * 1000}


class Refused(NamedTuple):
    """A 429, with the seconds its Retry-After asks for (1 when it gives none or an HTTP date)."""

    retry_after: float


def _ttft(client: httpx.Client, key: str, question: str, whole: bool = False) -> float | Refused | None:
    """Seconds to the first token of a streamed request: the first chunk with text (the opening chunk, sent
    before the engine has computed anything, carries an empty one; None for a stream without text); Refused
    when refused. `whole`: read the
    stream to its end (a flooding client), else leave after the first token. Each client keeps its
    connection, as the OpenAI SDK's does: a new connection per request costs the client here (in the
    server's 2 cores) an order of magnitude more than the server's refusal."""
    body = {"model": "pirate", "stream": True, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": question}]}
    started = time.monotonic()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) \
            as response:
        if response.status_code != 200:
            retry = response.headers.get("retry-after", "")
            return Refused(float(retry) if retry.isdigit() else 1.0)
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and any(
                    choice["delta"].get("content") for choice in json.loads(line[6:])["choices"]):
                first = time.monotonic() - started
                if not whole:
                    break
    return first


def bench_fairness(rounds: int, flood: str = "sdk") -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    # configs/default.yaml (the demo experts), with tenants on
    env = {"LORAPLEX_DATA_DIR": str(workdir / "data"), "LORAPLEX_TENANTS": "true", "LORAPLEX_ADMIN_KEY": ADMIN_KEY,
           "LORAPLEX_MAX_BATCH_SIZE": "8", "LORAPLEX_DEFAULT_MAX_TOKENS": "64"}
    server = ServerProcess(workdir, None, env=env).start()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        keys = {}
        for name, limits in (("a", {"max_concurrent": 2}), ("b", {})):
            tenant = httpx.post(server.base_url + "/v1/tenants", headers=admin, json={"name": name, "limits": limits})
            keys[name] = httpx.post(server.base_url + f"/v1/tenants/{tenant.json()['id']}/keys",
                                    headers=admin).json()["key"]
        questions = ["Tell me about the sea.", "What is a ship?", "Describe a storm.", "Who was Blackbeard?"]
        b = httpx.Client(base_url=server.base_url, timeout=300)
        # the router's encoders load and index the experts on a thread after /health answers ok: measured
        # beside that, the idle run's slowest requests were the build's, not the server's at rest
        deadline = time.monotonic() + 300
        while "loading" in str(b.get("/health").json().get("router")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for question in questions:  # warm-up: the adapter loaded, the first compilations done
            _ttft(b, keys["b"], question)
        idle = [_ttft(b, keys["b"], questions[i % 4]) for i in range(rounds)]
        stop, refused, served = threading.Event(), [0], [0]

        def flood_client():
            with httpx.Client(base_url=server.base_url, timeout=300) as a:
                while not stop.is_set():
                    answer = _ttft(a, keys["a"], "Write a long story about a pirate ship.", whole=True)
                    if isinstance(answer, Refused):
                        refused[0] += 1
                        time.sleep(answer.retry_after if flood == "sdk" else 0.05)
                    else:
                        served[0] += 1

        flooders = [threading.Thread(target=flood_client) for _ in range(8)]  # 4x tenant a's max_concurrent of 2
        for thread in flooders:
            thread.start()
        time.sleep(5)
        loaded = [_ttft(b, keys["b"], questions[i % 4]) for i in range(rounds)]
        stop.set()
        for thread in flooders:
            thread.join(300)
    finally:
        server.stop()
    idle_ok, loaded_ok = [t for t in idle if isinstance(t, float)], [t for t in loaded if isinstance(t, float)]
    return {"rounds": rounds, "flood": flood, "idle_ttft_p50_s": statistics.median(idle_ok), "idle_ttft_p99_s": _pct(idle_ok, 0.99),
            "loaded_ttft_p50_s": statistics.median(loaded_ok), "loaded_ttft_p99_s": _pct(loaded_ok, 0.99),
            "ratio_p99": _pct(loaded_ok, 0.99) / _pct(idle_ok, 0.99), "b_refused": rounds - len(loaded_ok),
            "a_served": served[0], "a_refused": refused[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auth", action="store_true", help="the authentication + limit check micro-benchmark")
    parser.add_argument("--fairness", action="store_true", help="tenant B's TTFT while tenant A floods (a server)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--flood", choices=("sdk", "hammer"), default="sdk",
                        help="how tenant A's clients take a 429: wait its Retry-After (sdk) or retry after 50 ms")
    args = parser.parse_args(argv)
    if not (args.auth or args.fairness):
        parser.error("give --auth, --fairness or both")
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if args.auth:
        result["auth"] = {**stamp("loadtests.bench_tenants", ["--auth"]), **bench_auth(args.calls),
                          "load_average": os.getloadavg()[0]}
        print(json.dumps(result["auth"], indent=1))
    if args.fairness:
        key = "fairness" if args.flood == "sdk" else "fairness_hammer"
        result[key] = {**stamp("loadtests.bench_tenants", ["--fairness", "--rounds", str(args.rounds), "--flood",
                                                           args.flood]),
                       **bench_fairness(args.rounds, args.flood), "load_average": os.getloadavg()[0]}
        print(json.dumps(result[key], indent=1))
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
