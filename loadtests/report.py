"""Markdown table for the README from bench_serving runs: python -m loadtests.report [files...]

Default: every loadtests/results/bench_serving*.json, oldest first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(runs: list[dict]) -> str:
    def speeds(key: str) -> str:
        return " / ".join(f"{run[key]['tokens_per_s']:.0f}" for run in runs)

    def ratios(key: str) -> str:
        return " / ".join(f"{run['ratios'][key]:.2f}" for run in runs)

    dates = sorted({run["date"][:10] for run in runs})
    return "\n".join([
        f"{len(runs)} runs of `make bench`, {', '.join(dates)}, on {runs[0]['machine']}:",
        "",
        "| tokens/s (each run) | |",
        "| --- | --- |",
        f"| loraplex, 16 requests over 4 adapters | {speeds('loraplex_mixed')} |",
        f"| loraplex, same load, no adapter | {speeds('loraplex_no_adapter')} |",
        f"| naive PEFT `set_adapter` + `generate()`, one request at a time | {speeds('naive')} |",
        f"| loraplex, one request (64 tokens, end to end over HTTP) | {speeds('loraplex_single')} |",
        f"| raw `model.generate()`, same request | {speeds('raw_generate')} |",
        "",
        "| ratio | goal | each run |",
        "| --- | --- | --- |",
        f"| mixed adapters / no adapter (the LoRA tax) | >= 0.85 | {ratios('mixed_vs_no_adapter')} |",
        f"| mixed adapters / naive loop | >= 3 | {ratios('mixed_vs_naive')} |",
        f"| single request / raw `generate()` | >= 0.9 | {ratios('single_vs_raw_generate')} |",
    ])


def main() -> None:
    files = [Path(f) for f in sys.argv[1:]] or sorted(RESULTS.glob("bench_serving*.json"), key=lambda p: p.stat().st_mtime)
    print(table([json.loads(f.read_text()) for f in files]))


if __name__ == "__main__":
    main()
