"""Structured outputs benchmark (issue 18): what constrained rows cost a batch, and schema compile time.

    python -m loadtests.bench_structured [--rounds 3]

1. Decode at batch 16 on the real server (default SmolLM2): 16 free streams, against 8 free plus 8
   constrained by a JSON schema that keeps them generating (a long array of short strings); every
   row runs `--tokens` tokens (ignore_eos). Output tokens/s of the whole batch, and the free rows'
   median inter-token gap, alternated `--rounds` times; ratios constrained-half / none.
2. Grammar preparation for the 22 schemas of loadtests/data/structured_schemas.json, in process on the
   same tokenizer: check + compile + a warmed matcher, p50 / p99, first time and again (llguidance
   keeps no compiled-grammar cache for us: the second time shows what a repeat costs).
Writes loadtests/results/bench_structured.json.
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

from tests.support.harness import REPO, ServerProcess, run_together
from loadtests.loadgen import percentile
from loadtests.provenance import stamp

BASE = "SmolLM2-135M-Instruct"
SCHEMAS = json.loads((REPO / "loadtests" / "data" / "structured_schemas.json").read_text())["schemas"]
LONG_ARRAY = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                         "minItems": 200}}, "required": ["words"]}


def _stream(base_url: str, index: int, constrained: bool, tokens: int, record: dict) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": f"List words about topic {index}."}],
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "words", "schema": LONG_ARRAY}}
    times = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    record.update(times=times, constrained=constrained)


def batch(base_url: str, rows: int, constrained_rows: int, tokens: int) -> dict:
    records = [{} for _ in range(rows)]
    threads = [threading.Thread(target=_stream, args=(base_url, i, i < constrained_rows, tokens, records[i]))
               for i in range(rows)]
    wall = run_together(threads)
    free_gaps = [(b - a) * 1000 for r in records if not r["constrained"] for a, b in zip(r["times"], r["times"][1:])]
    return {"rows": rows, "constrained_rows": constrained_rows, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(rows * tokens / wall, 1),
            "free_gap_p50_ms": round(percentile(free_gaps, 50), 1)}


def compile_times() -> dict:
    from transformers import AutoTokenizer

    from models.base_model import convert_embedded
    from server.api.protocol import ResponseFormat
    from server.api.structured import OutputFormats
    from server.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(convert_embedded(Settings().cache_dir))
    start = time.perf_counter()
    formats = OutputFormats(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    startup = time.perf_counter() - start
    runs: dict[str, list[float]] = {"first": [], "again": []}
    for label in runs:
        for item in SCHEMAS:
            fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
                "name": item["name"], "schema": item["schema"]}})
            start = time.perf_counter()
            formats.constraints(formats.for_response_format(fmt), 1)
            runs[label].append((time.perf_counter() - start) * 1000)
    return {"schemas": len(SCHEMAS), "startup_s": round(startup, 2), "cached": False,
            **{f"{label}_p50_ms": round(percentile(times, 50), 2) for label, times in runs.items()},
            **{f"{label}_p99_ms": round(percentile(times, 99), 2) for label, times in runs.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "bench_structured.json")
    args = parser.parse_args(argv)
    result: dict = {**stamp("loadtests.bench_structured", argv), "batch": {"none": [], "half": []}}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), {"compute_dtype": "float32", "router": "none", "max_batch_size": 16}).start()
        try:
            batch(server.base_url, 16, 8, 8)  # warm-up: the grammar's lexer states, the kernels
            for _ in range(args.rounds):  # alternated: this machine's speed drifts
                for name, constrained in (("none", 0), ("half", 8)):
                    result["batch"][name].append(batch(server.base_url, 16, constrained, args.tokens))
                    print(name, result["batch"][name][-1], flush=True)
        finally:
            server.stop()
    result["compile"] = compile_times()
    print(result["compile"])
    median = {name: {key: statistics.median(run[key] for run in runs) for key in ("output_tokens_per_s",
                                                                                 "free_gap_p50_ms")}
              for name, runs in result["batch"].items()}
    result["median"] = median
    result["ratios"] = {
        "throughput_half_over_none": round(median["half"]["output_tokens_per_s"] / median["none"]["output_tokens_per_s"], 3),
        "free_gap_none_over_half": round(median["none"]["free_gap_p50_ms"] / median["half"]["free_gap_p50_ms"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return result


if __name__ == "__main__":
    main()
