"""How free text's loop rule (server/engine/loops.py) would end answers written for other prompts than the
ones it is reported on: the check made before each change of the rule, kept so anyone can rerun it.

    LORAPLEX_LOOP_STOP_TOKENS=0 loraplex serve --config configs/default.yaml --port 18003   # the watch off
    python -m loadtests.bench_loop_rule --url http://127.0.0.1:18003 [--answers FILE] [--compare words|tokens]

92 prompts on `auto`, greedy, 512 tokens, written with the server's own loop watch off: the test and
off-topic prompts of `loadtests/data/router_eval_styles.json` (every off-topic prompt, every fourth test
prompt) and 20 prompts written to be risky for a loop rule (songs with a chorus, refrains, getters, HTML,
JSON, SQL, YAML, a countdown, "repeat after me three times"). Each answer's tokens are then watched offline
by an earlier rule and by today's, both with `loop_stop_tokens` 64. `--compare tokens` (2026-12-05, first
run): exact tokens and four copies vs words and three copies of a long block; `--compare words` (the
default): words, exact blocks only vs today's, which also ends a block coming back with a word changed
here and there (`NEAR_MATCH`); `--compare twice` (2026-12-05, third): today's rule without and with
a paragraph (64 words or more) ending at its second copy; `--compare block64` (2026-12-05, fourth):
that rule (a block of 64 words or more ends at its second copy) vs today's (a block of `TWICE_CHARS`
characters or more, spaces aside), and, in `by_size`, how many answers other sizes in characters would
end earlier than the 64-word rule, of those how many it never ends, and how many were written for a
risky prompt. Printed, and written to loadtests/results/bench_loop_rule[_tokens|_twice|_block64].json: how
many answers each rule ends, and every answer today's rule ends earlier than the earlier one, with the
text it keeps and the text it drops, to be read: a song, a list or code among them would be a wrong cut.
`--answers FILE` keeps the written answers there and reads them back on a later run (no server needed).
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import openai
from transformers import AutoTokenizer

from loadtests.provenance import stamp
from models.base_model import EMBEDDED_BASE, resolve_base_folder
from server.engine.loops import MIN_REPEATS, TEXT_MAX_PERIOD, TEXT_REPEATS, TWICE_CHARS, LoopWatch, text_words

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / "data"
SPAN, TOKENS = 64, 512
RISKY = [
    "Write a song about the sea with a chorus that repeats after every verse.",
    "Write the lyrics of a children's song where the same line is sung three times.",
    "Write a poem with a refrain that repeats at the end of each stanza.",
    "Write a Python class with five getter methods for name, age, email, phone and address.",
    "Write an HTML table with five rows of products and their prices.",
    "Write unit tests in Python for a function add(a, b), one test per case: positive, negative, zero, floats.",
    "Write a JSON array of five users, each with name, email and age.",
    "List the days of the week, each with one sentence about what people often do on it.",
    "Write a SQL script that inserts five rows into a table called books.",
    "Write a C function that prints a 5 by 5 multiplication table.",
    "Give me a weekly workout plan with one line per day.",
    "Write a countdown from 10 to 1, one number per line, then say liftoff.",
    "Write a short story where a character knocks on a door three times, saying the same words each time.",
    "Write a CSS stylesheet for buttons in five colors.",
    "Write a bash script that creates five folders named after the months January to May.",
    "Write a YAML config with three services, each with image, port and restart policy.",
    "Repeat after me three times: practice makes perfect.",
    "Write a markdown checklist for packing for a beach trip.",
    "Write a Java enum of the planets with their order from the sun.",
    "Write a limerick, then write it again in capital letters.",
]


def prompts() -> list[tuple[str, str]]:
    styles = json.loads((DATA / "router_eval_styles.json").read_text())
    tests = [p for expert in styles["experts"].values() for p in expert["test"]][::4]
    return [("risky", p) for p in RISKY] + [("styles", p) for p in styles["off_topic"] + tests]


def ends_at(ids: list[int], watch: LoopWatch) -> int | None:
    """The answer's length in tokens where `watch` would end it, or None."""
    tokens: list[int] = []
    for generated, token in enumerate(ids, 1):
        tokens.append(token)
        if watch.push(tokens, generated):
            return generated
    return None


def text_watch(keys: list[int], widths: list[int], twice: int | None = TWICE_CHARS) -> LoopWatch:
    """Free text's watch as the engine sets it up (`twice`: the block that ends at its second copy, in
    characters of `widths`; widths of 1 count it in words, as the rule before `TWICE_CHARS` did)."""
    return LoopWatch(SPAN, TEXT_MAX_PERIOD, keys=keys, repeats=TEXT_REPEATS, twice=twice, widths=widths)


def earlier_watch(compare: str, keys: list[int], widths: list[int]) -> LoopWatch:
    """The rule today's is compared with (`--compare`)."""
    if compare == "tokens":
        return LoopWatch(SPAN, repeats=MIN_REPEATS)
    if compare == "twice":
        return text_watch(keys, widths, twice=None)
    if compare == "block64":
        return text_watch(keys, [1] * len(widths), twice=64)
    return LoopWatch(SPAN, keys=keys, repeats=TEXT_REPEATS, near_match=None)


def by_size(written: list[dict], ids_of: list[list[int]], before: list[int | None], keys: list[int],
            widths: list[int]) -> dict[int, dict]:
    """Per size in characters of the block that ends at its second copy: the answers it ends earlier than
    the 64-word rule does (`before`: where that rule ends each), those among them that rule never ends, and
    those written for a risky prompt."""
    sizes = {}
    for size in (300, 240, 200, 160, 120, 100, 80, 60):
        now = [ends_at(ids, text_watch(keys, widths, twice=size)) for ids in ids_of]
        cut = [(answer, old) for answer, old, new in zip(written, before, now)
               if new is not None and (old is None or new < old)]
        sizes[size] = {"ended_earlier": len(cut), "not_ended_before": sum(old is None for _, old in cut),
                       "risky": sum(answer["kind"] == "risky" for answer, _ in cut)}
    return sizes


async def answers(url: str, cases: list[tuple[str, str]]) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
    gate = asyncio.Semaphore(4)

    async def ask(kind: str, prompt: str) -> dict:
        async with gate:
            response = await client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS, temperature=0)
        return {"kind": kind, "prompt": prompt, "finish_reason": response.choices[0].finish_reason,
                "text": response.choices[0].message.content}

    return list(await asyncio.gather(*(ask(kind, prompt) for kind, prompt in cases)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a server started with LORAPLEX_LOOP_STOP_TOKENS=0")
    parser.add_argument("--answers", type=Path, default=None,
                        help="keep the answers here; read them from here when the file exists")
    parser.add_argument("--compare", choices=("words", "tokens", "twice", "block64"), default="words",
                        help="the earlier rule: words with exact blocks only (default), exact tokens, today's "
                             "without a paragraph ending at its second copy, or today's with that block 64 words")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_folder(EMBEDDED_BASE)[0])
    keys, widths = text_words(tokenizer)
    if args.answers is not None and args.answers.is_file():
        written = json.loads(args.answers.read_text())
    else:
        if not args.url:
            parser.error("--url is needed to write the answers")
        written = asyncio.run(answers(args.url, prompts()))
        if args.answers is not None:
            args.answers.write_text(json.dumps(written, indent=1, ensure_ascii=False) + "\n")
    old_ends = new_ends = 0
    earlier = []
    ids_of = [tokenizer.encode(answer["text"], add_special_tokens=False) for answer in written]
    olds = [ends_at(ids, earlier_watch(args.compare, keys, widths)) for ids in ids_of]
    for answer, ids, old in zip(written, ids_of, olds):
        new = ends_at(ids, text_watch(keys, widths))
        old_ends, new_ends = old_ends + (old is not None), new_ends + (new is not None)
        if new is not None and (old is None or new < old):
            earlier.append({"kind": answer["kind"], "prompt": answer["prompt"], "tokens": len(ids), "old": old,
                            "new": new, "kept_tail": tokenizer.decode(ids[:new])[-250:],
                            "dropped": tokenizer.decode(ids[new:])[:250]})
    extra = {"by_size": by_size(written, ids_of, olds, keys, widths)} if args.compare == "block64" else {}
    result = {**stamp("loadtests.bench_loop_rule", argv), "compare": args.compare, "answers": len(written),
              "max_tokens": TOKENS,
              "ended_by_old_rule": old_ends, "ended_by_new_rule": new_ends,
              "ended_earlier_by_new_rule": len(earlier),
              "ended_earlier_risky": sum(e["kind"] == "risky" for e in earlier), **extra, "earlier": earlier}
    out = RESULTS / {"tokens": "bench_loop_rule_tokens.json", "twice": "bench_loop_rule_twice.json",
                     "block64": "bench_loop_rule_block64.json", "words": "bench_loop_rule.json"}[args.compare]
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for cut in earlier:
        print(f"--- [{cut['kind']}] {cut['prompt'][:70]!r}: at {cut['new']} of {cut['tokens']} (old rule: {cut['old']})")
        print("    kept:   ", repr(cut["kept_tail"][-160:]))
        print("    dropped:", repr(cut["dropped"][:160]))
    print(json.dumps({k: v for k, v in result.items() if k != "earlier"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
