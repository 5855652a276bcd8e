"""How long `loraplex serve` on the default config takes to be ready, and what it then holds, with the
garbage collector off while it starts (what the command line does) against on (the start before it).

    python -m loadtests.bench_startup [--rounds 3]

Each round starts the server once each way, one after the other (the order alternating), on a free port
with a fresh data folder, and stops it after: seconds from launch until /health answers `ok` (the engine
loaded: requests are served) and until it says the router is `ready`, and the process's resident memory
then (after the collection that turns the collector back on). Both ways run the same command line, through
the same wrapper; "collector on" only makes its `gc.disable()` a no-op, so the server never turns it off.
Written to loadtests/results/bench_startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.bench_vs_llama import resident_bytes
from loadtests.provenance import stamp
from tests.support.harness import REPO, free_port, stop_process

RESULTS = Path(__file__).parent / "results"
WRAPPER = ("import gc, runpy, sys\n"
           "if sys.argv[1] == 'on': gc.disable = lambda: None\n"
           "sys.argv = ['loraplex', *sys.argv[2:]]\n"
           "runpy.run_module('server.startup.cli', run_name='__main__')\n")


def start_once(collector: str, workdir: Path, timeout: float = 300) -> dict:
    """One start with the collector `on` or `off` while starting; stopped once the router is ready."""
    port = free_port()
    log = open(workdir / f"server-{collector}-{port}.log", "wb")
    launched = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, collector, "serve", "--port", str(port)], cwd=REPO,
                            env={**os.environ, "LORAPLEX_DATA_DIR": str(workdir / f"data-{port}")},
                            stdout=log, stderr=subprocess.STDOUT)
    ok = router = None
    try:
        while router is None:
            if proc.poll() is not None or time.perf_counter() - launched > timeout:
                raise RuntimeError(f"server did not start: {(workdir / log.name).read_text()[-2000:]}")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                health = {}
            now = time.perf_counter() - launched
            if ok is None and health.get("status") == "ok":
                ok = now
            if health.get("router") == "ready":
                router = now
            time.sleep(0.05)
        time.sleep(2)  # the collection that turns the collector back on runs once the router is ready
        return {"ok_s": round(ok, 2), "router_ready_s": round(router, 2), "resident_mib": resident_bytes(proc.pid) >> 20}
    finally:
        stop_process(proc, grace=60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for round_ in range(args.rounds):
            for collector in (("on", "off") if round_ % 2 == 0 else ("off", "on")):
                runs[collector].append(start_once(collector, Path(tmp)))
                print(collector, runs[collector][-1], flush=True)
    median = {c: {k: statistics.median(r[k] for r in rs) for k in ("ok_s", "router_ready_s", "resident_mib")}
              for c, rs in runs.items()}
    result = {**stamp("loadtests.bench_startup", argv), "rounds": args.rounds, "runs": runs, "median": median,
              "ratios": {"ok_on_over_off": round(median["on"]["ok_s"] / median["off"]["ok_s"], 2),
                         "router_ready_on_over_off": round(median["on"]["router_ready_s"]
                                                           / median["off"]["router_ready_s"], 2)}}
    (RESULTS / "bench_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "ratios")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
