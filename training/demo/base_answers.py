"""The default base's own answers to the demo prompts: the content the demo experts reshape.

    loraplex serve --config <a config with `adapters: {}`> --port 8000 &   (the base alone)
    python -m training.demo.base_answers [--base-url http://127.0.0.1:8000]
                                                 (once; writes training/demo/base_answers.json)

Why the base's answers: the demo experts teach a *form* (JSON, a pirate's voice, one-sentence
summaries), not knowledge. Training them on the base's own greedy answers, reshaped, teaches the
form over everyday content of every kind without teaching the 135M model facts it does not have,
and it needs no download. The answers come from a running `loraplex serve` (the base, no experts)
through the openai client, 8 at a time; the file is committed so the training data can be rebuilt
without the model.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.demo.prompts import FOLLOW_UPS, HELD_OUT_TOPICS, training_prompts

HERE = Path(__file__).resolve().parent
OUT = HERE / "base_answers.json"


def main(argv: list[str] | None = None) -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loraplex server serving the base")
    args = parser.parse_args(argv)
    prompts = training_prompts()
    paragraphs = [f"Write a short paragraph about {t}." for t in HELD_OUT_TOPICS]  # terse's held-out inputs
    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
    base = client.models.list().data[0].id

    def ask(messages: list[dict]) -> str:
        reply = client.chat.completions.create(model=base, messages=messages, temperature=0, max_tokens=96)
        return reply.choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: ask([{"role": "user", "content": p}]), prompts + paragraphs))
        first = dict(zip(prompts, answers))
        follow_ups = list(pool.map(
            lambda i: ask([{"role": "user", "content": prompts[i]},
                           {"role": "assistant", "content": first[prompts[i]]},
                           {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}]),
            range(0, len(prompts), 5)))  # every fifth conversation gets a second turn
    record = {"answers": dict(zip(prompts + paragraphs, answers)),
              "follow_ups": {prompts[i]: {"question": FOLLOW_UPS[i % len(FOLLOW_UPS)], "answer": a}
                             for i, a in zip(range(0, len(prompts), 5), follow_ups)}}
    OUT.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    print(f"{len(record['answers'])} answers, {len(record['follow_ups'])} follow-ups -> {OUT}")


if __name__ == "__main__":
    main()
