"""Mixtures of experts: what blending costs a decode step, and what it does to answers.

    python -m loadtests.bench_mixtures [--batch 16] [--max-tokens 64] [--skip-behaviour]

1. Cost (the model runner alone, default model, NF4, float32 compute, the three demo experts, rank 8):
   the median time of one decode step at --batch rows where every row uses one expert (the three
   interleaved), every row blends two (pirate+json-answer, json-answer+terse, terse+pirate in turn), and
   every row blends all three; three alternated rounds of 30 steps. Throughput ratios: mixed / single.
2. Behaviour (the real server, configs/default.yaml): the held-out prompts of the json-answer and
   pirate experts (training/demo/*/heldout.json) sent, greedy, to `pirate+json-answer` (both in full),
   `X-Expert: json-answer:1,pirate:0.5` and `json-answer:0.5,pirate:0.5` (an average): the share of
   answers that are one JSON object, that use pirate words, and both at once; each expert alone too.
Writes loadtests/results/bench_mixtures.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import torch

from models.base_model import EMBEDDED_BASE, load_base
from adapters.lora import BaseShape, load_lora
from loadtests.bench_decode_step import time_steps
from loadtests.bench_experts import DEMO, PIRATE_WORDS, is_json_object
from tests.support.harness import REPO, ServerProcess
from loadtests.provenance import stamp
from server.engine.model_runner import ModelRunner, StepItem
from server.settings import Settings

EXPERTS = ("json-answer", "pirate", "terse")


def cost(batch: int) -> dict:
    torch.manual_seed(0)
    base = load_base(EMBEDDED_BASE, compute_dtype="float32")
    runner = ModelRunner(base.model, base.tokenizer, batch * 3 + 1, 16, 256)
    shape = BaseShape.from_config(base.model.config)
    for name in EXPERTS:
        runner.lora.add(name, load_lora(DEMO / name / "adapter", shape))
    tables = [[1 + 3 * i, 2 + 3 * i, 3 + 3 * i] for i in range(batch)]
    runner.step([StepItem(list(range(100, 140)), 0, table, None) for table in tables])
    pairs = [(EXPERTS[i], EXPERTS[(i + 1) % 3]) for i in range(3)]
    layouts = {
        "base": [None] * batch,
        "single": [EXPERTS[i % 3] for i in range(batch)],
        "mix2": [tuple((name, 0.5) for name in pairs[i % 3]) for i in range(batch)],
        "mix3": [tuple((name, 1 / 3) for name in EXPERTS)] * batch,
    }
    for adapters in layouts.values():
        time_steps(runner, tables, adapters, 5)  # warm-up
    runs = {name: [] for name in layouts}
    for _ in range(3):  # alternated rounds: this machine's speed drifts
        for name, adapters in layouts.items():
            runs[name].append(time_steps(runner, tables, adapters, 30))
    ms = {name: statistics.median(values) for name, values in runs.items()}
    return {"batch": batch, "decode_step_ms": ms,
            "throughput_vs_single": {"mix2": ms["single"] / ms["mix2"], "mix3": ms["single"] / ms["mix3"]},
            "single_vs_base": ms["base"] / ms["single"]}


def _rates(answers: list[str]) -> dict:
    json_ok = [is_json_object(a) for a in answers]
    pirate = [bool(PIRATE_WORDS.search(a)) for a in answers]
    return {"json_object_rate": sum(json_ok) / len(answers), "pirate_word_rate": sum(pirate) / len(answers),
            "both_rate": sum(j and p for j, p in zip(json_ok, pirate)) / len(answers)}


async def _answers(client, prompts, model, headers, max_tokens):
    async def one(prompt):
        reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=max_tokens, extra_headers=headers)
        return reply.choices[0].message.content

    return await asyncio.gather(*(one(p) for p in prompts))


def behaviour(max_tokens: int) -> dict:
    import openai

    prompts = []
    for name in ("json-answer", "pirate"):
        prompts += json.loads((DEMO / name / "heldout.json").read_text())["prompts"]
    prompts = list(dict.fromkeys(prompts))
    askers = {"pirate+json-answer": ("pirate+json-answer", None),  # both in full
              "json-answer:1,pirate:0.5": ("json-answer", {"X-Expert": "json-answer:1,pirate:0.5"}),
              "json-answer:0.5,pirate:0.5": ("json-answer", {"X-Expert": "json-answer:0.5,pirate:0.5"}),
              "json-answer": ("json-answer", None), "pirate": ("pirate", None)}
    with tempfile.TemporaryDirectory() as workdir:
        server = ServerProcess(Path(workdir), None, env={"LORAPLEX_CACHE": Settings().cache_dir}).start()
        try:
            async def run():
                async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                              timeout=600) as client:
                    out = {}
                    for label, (model, headers) in askers.items():
                        answers = await _answers(client, prompts, model, headers, max_tokens)
                        out[label] = {**_rates(answers), "sample": {"prompt": prompts[0], "answer": answers[0]}}
                    return out

            report = asyncio.run(run())
        finally:
            server.stop()
    return {"prompts": len(prompts), "max_tokens": max_tokens, "answers": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-behaviour", action="store_true")
    args = parser.parse_args()
    result = {**stamp("loadtests.bench_mixtures"), "cost": cost(args.batch)}
    print(json.dumps(result["cost"], indent=2))
    if not args.skip_behaviour:
        result["behaviour"] = behaviour(args.max_tokens)
        print(json.dumps(result["behaviour"], indent=2))
    out = REPO / "loadtests" / "results" / "bench_mixtures.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
