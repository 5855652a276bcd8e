"""Demo experts against the base on held-out prompts (issue 7).

    python -m loadtests.bench_experts [--max-tokens 64]

Serves configs/default.yaml (the base plus the demo experts under training/demo/), sends
each expert's 50 held-out prompts (training/demo/<name>/heldout.json, none of them in the
training data) to the expert and to the base, greedy, and measures:
  json-answer  share of answers that parse as one JSON object
  pirate       share of answers using pirate words (arr, matey, ahoy, aye, ye, savvy, ...)
  terse        words per answer, and the share that are a single sentence
and, for every expert, the share of answers that end with the end-of-turn token before
max_tokens (finish_reason "stop"; the experts declare no stop strings). Writes
loadtests/results/bench_experts.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
from pathlib import Path

import openai

from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess
from models.base_model import EMBEDDED_NAME
from server.settings import Settings, load_settings

DEMO = REPO / "training" / "demo"
PIRATE_WORDS = re.compile(r"\b(arr+|matey|ahoy|aye|ye|savvy|hearty|shiver|timbers|yo ho|buccaneer|o')\b", re.I)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def metrics(expert: str, answers: list[str]) -> dict:
    if expert == "json-answer":
        return {"json_object_rate": sum(map(is_json_object, answers)) / len(answers)}
    if expert == "pirate":
        return {"pirate_word_rate": sum(bool(PIRATE_WORDS.search(a)) for a in answers) / len(answers)}
    words = [len(a.split()) for a in answers]
    sentences = [len(re.findall(r"[.!?](\s|$)", a.strip())) <= 1 for a in answers]
    return {"words_per_answer": sum(words) / len(words), "one_sentence_rate": sum(sentences) / len(sentences)}


async def ask_all(client, model: str, prompts: list[str], max_tokens: int) -> list[tuple[str, str]]:
    async def one(prompt):
        reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    return await asyncio.gather(*(one(p) for p in prompts))


async def evaluate(base_url: str, experts: list[str], max_tokens: int) -> dict:
    report = {}
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        for expert in experts:
            prompts = json.loads((DEMO / expert / "heldout.json").read_text())["prompts"]
            tuned = await ask_all(client, expert, prompts, max_tokens)
            base = await ask_all(client, EMBEDDED_NAME, prompts, max_tokens)
            report[expert] = {
                "prompts": len(prompts),
                "expert": {**metrics(expert, [a for a, _ in tuned]),
                           "ends_with_end_of_turn": sum(f == "stop" for _, f in tuned) / len(tuned)},
                "base": {**metrics(expert, [a for a, _ in base]),
                         "ends_with_end_of_turn": sum(f == "stop" for _, f in base) / len(base)},
                "sample": {"prompt": prompts[0], "expert": tuned[0][0], "base": base[0][0]},
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_experts.json"))
    args = parser.parse_args()
    config = load_settings(str(REPO / "configs" / "default.yaml"), environ={})
    settings = {**config.model_dump(exclude={"host", "port", "cache_dir", "data_dir"}), "max_batch_size": 16}
    server = ServerProcess(Path(tempfile.mkdtemp()), settings,
                           env={"LORAPLEX_CACHE": Settings().cache_dir}).start()
    try:
        # the style experts (with heldout.json); the skill experts are measured by loadtests/bench_moe.py
        styles = [name for name in config.adapters if (DEMO / name / "heldout.json").is_file()]
        report = asyncio.run(evaluate(server.base_url, styles, args.max_tokens))
    finally:
        server.stop()
    training = {name: json.loads((DEMO / name / "adapter" / "training.json").read_text()) for name in styles}
    out = {**stamp("loadtests.bench_experts"), "max_tokens": args.max_tokens, "experts": report, "training": training}
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, r in report.items():
        print(f"{name}: expert {r['expert']}  base {r['base']}")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
