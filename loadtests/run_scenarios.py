"""Load scenarios against loraplex and its baselines, in one run, on this machine.

    python -m loadtests.run_scenarios [--levels 1,4,8,16] [--max-tokens 32]

Starts loraplex (the default SmolLM2, NF4, float32 compute, four random rank-16 all-linear
adapters) and the naive PEFT server (loadtests/naive_server.py, same model and adapters),
then drives them with loadtests/loadgen.py: steady streaming load at each concurrency level
for loraplex over the 4 adapters, loraplex on the base, and the naive server over the 4
adapters (each level: 2 x concurrency requests, at least 8, after one unrecorded warm-up load over
every model); plus a burst, long prompts, non-streaming and router ("auto") traffic on loraplex.
Writes loadtests/results/scenarios.json, scenarios.md and two PNG plots; prints the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import torch

from adapters.lora import LINEAR_MODULES
from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess, free_port, make_peft_adapter, wait_until
from loadtests.loadgen import markdown, report, run
from models.base_model import EMBEDDED_NAME, convert_embedded
from server.settings import Settings

RESULTS = REPO / "loadtests" / "results"


# requests per concurrency level at least (2 x concurrency above): two requests of a lone client are
# too few to compare two loads on a machine that drifts by several percent
MIN_REQUESTS = 8


def _adapters(workdir: Path, count: int) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(convert_embedded(Settings().cache_dir), dtype=torch.float32)
    return {f"expert{i}": make_peft_adapter(fp32, workdir / f"expert{i}", seed=200 + i, rank=16, targets=LINEAR_MODULES,
                                            b_std=0.005) for i in range(count)}


def _start_naive(adapters: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    spec = ",".join(f"{name}={path}" for name, path in adapters.items())
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.naive_server", "--adapters", spec, "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(healthy, 300, interval=0.5):
        proc.kill()
        raise RuntimeError("the naive server did not start")
    return proc, url


def _load(url, scenario, models, concurrency, requests, max_tokens, stream=True):
    results = asyncio.run(run(url, scenario, models, concurrency, requests, max_tokens, stream, duration_s=600))
    return report(results)


def _plot(levels: list[int], series: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in series.items():
        ax.plot(levels, [r["overall"]["output_tokens_per_s"] for r in runs], marker="o", label=name)
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput against concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scenarios_throughput.png", dpi=110)
    files.append("scenarios_throughput.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in series.items():
        for q, style in (("p50", "-"), ("p99", "--")):
            ax.plot(levels, [r["overall"]["e2e_s"][q] for r in runs], style, marker="o", label=f"{name} {q}")
    ax.set(xlabel="concurrent requests", ylabel="end-to-end latency (s)", title="Latency percentiles", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scenarios_latency.png", dpi=110)
    files.append("scenarios_latency.png")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-scenarios-"))
    adapters = _adapters(workdir, args.adapters)
    names = list(adapters)
    settings = {"compute_dtype": "float32", "max_batch_size": max(levels),
                "adapters": {n: {"path": str(p), "description": f"expert {n}", "examples": [f"task for {n}"]}
                             for n, p in adapters.items()}}
    loraplex = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": Settings().cache_dir}).start()
    series = {"loraplex, 4 adapters": [], "loraplex, no adapter": [], "naive PEFT, 4 adapters": []}
    extra = {}
    try:
        # not recorded: the first requests after start pay one-off costs (each expert's first copy to the
        # device bank, allocator and BLAS warm-up) that would land on whichever load ran first
        _load(loraplex.base_url, "steady", names + [EMBEDDED_NAME], 4, 2 * (len(names) + 1), args.max_tokens)
        for level in levels:
            count = max(2 * level, MIN_REQUESTS)
            series["loraplex, 4 adapters"].append(_load(loraplex.base_url, "steady", names, level, count,
                                                        args.max_tokens))
            series["loraplex, no adapter"].append(_load(loraplex.base_url, "steady", [EMBEDDED_NAME], level,
                                                        count, args.max_tokens))
        extra["burst of 16"] = _load(loraplex.base_url, "burst", names, 16, 16, args.max_tokens)
        extra["long prompts (~1k tokens), 4 clients"] = _load(loraplex.base_url, "long", names, 4, 8, args.max_tokens)
        extra["not streaming, 8 clients"] = _load(loraplex.base_url, "steady", names, 8, 16, args.max_tokens,
                                                  stream=False)
        extra["router (auto), 8 clients"] = _load(loraplex.base_url, "auto", names, 8, 16, args.max_tokens)
    finally:
        loraplex.stop()
    naive, naive_url = _start_naive(adapters)
    try:
        for level in levels:
            series["naive PEFT, 4 adapters"].append(_load(naive_url, "steady", names, level,
                                                          max(2 * level, MIN_REQUESTS), args.max_tokens))
    finally:
        naive.terminate()
        naive.wait(30)

    ratios = {
        level: {
            "mixed_vs_no_adapter": series["loraplex, 4 adapters"][i]["overall"]["output_tokens_per_s"]
            / series["loraplex, no adapter"][i]["overall"]["output_tokens_per_s"],
            "mixed_vs_naive": series["loraplex, 4 adapters"][i]["overall"]["output_tokens_per_s"]
            / series["naive PEFT, 4 adapters"][i]["overall"]["output_tokens_per_s"],
        }
        for i, level in enumerate(levels)
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = _plot(levels, series, RESULTS)
    out = {**stamp("loadtests.run_scenarios"), "max_tokens": args.max_tokens, "levels": levels, "series": series, "scenarios": extra, "ratios": ratios,
           "plots": plots}
    (RESULTS / "scenarios.json").write_text(json.dumps(out, indent=2))
    lines = [f"`python -m loadtests.run_scenarios` ({out['date'][:10]}, {out['machine']}), streaming, "
             f"{args.max_tokens} new tokens per request:\n"]
    lines += ["| concurrency | loraplex 4 adapters tok/s | no adapter tok/s | naive tok/s | mixed / no adapter | "
              "mixed / naive |", "| --- | --- | --- | --- | --- | --- |"]
    for i, level in enumerate(levels):
        s = {k: v[i]["overall"]["output_tokens_per_s"] for k, v in series.items()}
        lines.append(f"| {level} | {s['loraplex, 4 adapters']:.0f} | {s['loraplex, no adapter']:.0f} | "
                     f"{s['naive PEFT, 4 adapters']:.0f} | {ratios[level]['mixed_vs_no_adapter']:.2f} | "
                     f"{ratios[level]['mixed_vs_naive']:.2f} |")
    for name, summary in extra.items():
        lines += ["", f"**{name}** (loraplex):", "", markdown(summary)]
    (RESULTS / "scenarios.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
