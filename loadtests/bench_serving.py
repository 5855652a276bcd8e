"""Serving benchmark (issue 2): mixed-adapter batching against its two baselines, in one run.

    python -m loadtests.bench_serving [--requests 16] [--tokens 64] [--adapters 4]

Measures, on the default SmolLM2 (NF4, float32 compute) and random rank-16 all-linear
adapters made with peft:
  1. loraplex, N concurrent requests spread over the adapters (the LoRA tax: vs 2.)
  2. loraplex, the same load on the base model (no adapters); 1. and 2. alternate
     --repeats times and each reports its median run
  3. naive: the same requests one at a time with PEFT set_adapter + generate()
  4. a single request through loraplex vs raw model.generate() on the same model
Prints the three ratios and writes a JSON report under loadtests/results/. The server runs
in a subprocess; the baselines run in this process while the server is idle.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import openai
import torch

from adapters.lora import LINEAR_MODULES
from tests.support.harness import REPO, ServerProcess, make_peft_adapter
from loadtests.provenance import stamp
from models.base_model import EMBEDDED_NAME, convert_embedded
from server.settings import Settings

QUESTIONS = [
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What are the benefits of exercise?",
    "Describe the city of Paris.",
    "How do computers store numbers?",
    "Give three tips for better sleep.",
    "What is photosynthesis?",
    "Tell me about the history of tea.",
]


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


async def _one(client: openai.AsyncOpenAI, model: str, i: int, tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=_messages(i), max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "e2e_s": end - start, "tokens": usage.completion_tokens}


async def _load(base_url: str, models: list[str], tokens: int) -> dict:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        await _one(client, models[0], 0, 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(_one(client, m, i, tokens) for i, m in enumerate(models)))
        wall = time.perf_counter() - start
    total = sum(r["tokens"] for r in results)
    return {
        "requests": len(models),
        "wall_s": wall,
        "output_tokens": total,
        "tokens_per_s": total / wall,
        "mean_ttft_s": sum(r["ttft_s"] for r in results) / len(results),
    }


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "all_tokens_per_s": [run["tokens_per_s"] for run in runs]}


def _naive_and_raw(folder: Path, adapters: dict[str, Path], models: list[str], tokens: int, base: str) -> dict:
    """The loop most people write first: PEFT model, set_adapter, generate(), one request at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant).eval()

    def generate(m, i: int) -> int:
        ids = tokenizer.apply_chat_template(_messages(i), add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = m.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    with torch.inference_mode():
        generate(model, 0)  # warm-up
        start = time.perf_counter()
        raw_tokens = generate(model, 0)
        raw = {"wall_s": time.perf_counter() - start, "output_tokens": raw_tokens}
        raw["tokens_per_s"] = raw_tokens / raw["wall_s"]

        names = list(adapters)
        # a fresh load: PEFT wrapping a bitsandbytes NF4 model that already ran a forward on CPU changes
        # its outputs (bitsandbytes repacks CPU weights on the first forward; loadtests/gpu_smoke.py)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant).eval()
        peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(adapters[name], adapter_name=name)
        start = time.perf_counter()
        total = 0
        for i, name in enumerate(models):
            if name == base:
                with peft_model.disable_adapter():
                    total += generate(peft_model, i)
            else:
                peft_model.set_adapter(name)
                total += generate(peft_model, i)
        wall = time.perf_counter() - start
    naive = {"requests": len(models), "wall_s": wall, "output_tokens": total, "tokens_per_s": total / wall}
    return {"naive": naive, "raw_generate": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the mixed and base loads")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_serving.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    cache_dir = Settings().cache_dir
    folder = convert_embedded(cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapters = {
        f"expert{i}": make_peft_adapter(fp32, workdir / f"expert{i}", seed=100 + i, rank=args.rank,
                                        targets=LINEAR_MODULES, b_std=0.005)
        for i in range(args.adapters)
    }
    del fp32
    names = list(adapters)
    mixed_models = [names[i % len(names)] for i in range(args.requests)]
    base_models = [EMBEDDED_NAME] * args.requests

    settings = {
        "compute_dtype": "float32",
        "max_batch_size": max(args.requests, 1),
        "adapters": {name: {"path": str(path)} for name, path in adapters.items()},
    }
    server = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    try:
        # alternate the two loads and keep each one's median run: this machine's speed drifts
        # by several percent over a minute, which a single back-to-back pair would bake in
        mixed_runs, base_runs = [], []
        for _ in range(args.repeats):
            mixed_runs.append(asyncio.run(_load(server.base_url, mixed_models, args.tokens)))
            base_runs.append(asyncio.run(_load(server.base_url, base_models, args.tokens)))
        mixed, base = _median_run(mixed_runs), _median_run(base_runs)
        single = asyncio.run(_load(server.base_url, [EMBEDDED_NAME], args.tokens))
    finally:
        server.stop()
    baselines = _naive_and_raw(folder, adapters, mixed_models, args.tokens, EMBEDDED_NAME)

    ratios = {
        "mixed_vs_no_adapter": mixed["tokens_per_s"] / base["tokens_per_s"],
        "mixed_vs_naive": mixed["tokens_per_s"] / baselines["naive"]["tokens_per_s"],
        "single_vs_raw_generate": single["tokens_per_s"] / baselines["raw_generate"]["tokens_per_s"],
    }
    report = {
        **stamp("loadtests.bench_serving"),
        "config": vars(args),
        "loraplex_mixed": mixed,
        "loraplex_no_adapter": base,
        "loraplex_single": single,
        **baselines,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"loraplex mixed ({args.adapters} adapters): {mixed['tokens_per_s']:.1f} tok/s")
    print(f"loraplex no adapter:          {base['tokens_per_s']:.1f} tok/s")
    print(f"naive set_adapter+generate:   {baselines['naive']['tokens_per_s']:.1f} tok/s")
    print(f"loraplex single request:      {single['tokens_per_s']:.1f} tok/s")
    print(f"raw model.generate():         {baselines['raw_generate']['tokens_per_s']:.1f} tok/s")
    print(f"ratio mixed / no adapter:     {ratios['mixed_vs_no_adapter']:.2f}  (goal >= 0.85)")
    print(f"ratio mixed / naive:          {ratios['mixed_vs_naive']:.2f}  (goal >= 3)")
    print(f"ratio single / raw generate:  {ratios['single_vs_raw_generate']:.2f}  (goal >= 0.9)")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
