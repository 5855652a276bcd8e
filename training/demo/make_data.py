"""Write the demo experts' training chats and held-out prompts (deterministic, no downloads).

    python -m training.demo.make_data

Three clearly different experts for the default SmolLM2 base, each a *form* applied to everyday
content (the base's own answers, training/demo/base_answers.json, to 120 topics x 5 phrasings):
  json-answer  answers with exactly one JSON object, {"answer": "..."}
  pirate       answers in a pirate's voice
  terse        summarises a paragraph in one short sentence
Answers are one to three sentences long; every fifth conversation has a second turn answered the
same way. The first version trained on a few fact templates and learned the templates: asked
anything else, json-answer nested JSON in JSON until the token budget. Held-out prompts
(training/demo/prompts.py) share neither topics nor phrasings with the training chats.
Each expert gets training/demo/<name>/train.jsonl and heldout.json.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from training.demo.prompts import HELD_OUT_TOPICS, held_out_prompts, training_prompts

HERE = Path(__file__).resolve().parent
ANSWERS = HERE / "base_answers.json"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PIRATE_OPENERS = ["Arr, matey!", "Ahoy!", "Aye, me hearty!", "Arr!", "Shiver me timbers!", "Avast, ye landlubber!"]
PIRATE_CLOSERS = ["Savvy?", "Yo ho ho!", "Arr!", "So says this old sea dog.", "Now back to the ship with ye!", ""]
PIRATE_WORDS = [(r"\byou\b", "ye"), (r"\bYou\b", "Ye"), (r"\byour\b", "yer"), (r"\bYour\b", "Yer"),
                (r"\bmy\b", "me"), (r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bof\b", "o'"), (r"\bfriends?\b", "mateys"),
                (r"\byes\b", "aye"), (r"\bhello\b", "ahoy"), (r"\bmoney\b", "treasure"), (r"\bthe sea\b", "the briny deep")]
SUMMARY_ASKS = ["Summarize in one sentence: ", "Summarize: ", "Give me a one-line summary: ", "TL;DR: ",
                "In one short sentence, what is this about? ", "Condense this to a single sentence:\n\n",
                "Please summarise the following text.\n", "Sum this up briefly: "]
HELD_OUT_SUMMARY_ASKS = ["Boil this down to one sentence: ", "What's the gist? "]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


def clip(text: str, count: int) -> str:
    """The first `count` complete sentences (a cut-off last sentence is dropped)."""
    parts = [s for s in sentences(text) if s[-1] in ".!?"][:count]
    return " ".join(parts)


def usable(text: str, repeats: int = 2) -> bool:
    """Content worth teaching: no loops (a three-word run repeated), no run-on sentence, no talk about itself.
    A 135M base loops on some prompts; training on its loops would teach the experts to loop."""
    words = re.findall(r"[a-z']+", text.lower())
    runs = Counter(tuple(words[i: i + 3]) for i in range(len(words) - 2))
    if runs and max(runs.values()) >= repeats:
        return False
    lowered = text.lower()
    return bool(text) and all(len(s.split()) <= 40 for s in sentences(text)) and not any(
        phrase in lowered for phrase in ("smollm", "ai assistant", "as an ai", "hugging face"))


def json_answer(text: str) -> str:
    return json.dumps({"answer": text}, ensure_ascii=False)


def pirate(rng: random.Random, text: str) -> str:
    for pattern, word in PIRATE_WORDS:
        text = re.sub(pattern, word, text)
    return " ".join(p for p in (rng.choice(PIRATE_OPENERS), text, rng.choice(PIRATE_CLOSERS)) if p)


def one_sentence(text: str, words: int = 20) -> str:
    first = sentences(text)[0].split()
    short = " ".join(first[:words]).rstrip(",;:")
    return short if short.endswith((".", "!", "?")) else short + "."


def _chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * (len(turns) // 2)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def build(seed: int = 0) -> dict[str, dict]:
    record = json.loads(ANSWERS.read_text())
    answers, follow_ups = record["answers"], record["follow_ups"]
    rng = random.Random(seed)
    chats = {"json-answer": [], "pirate": [], "terse": []}
    for prompt in training_prompts():
        count = rng.choice([1, 1, 2, 2, 3])  # short and long answers
        text = clip(answers[prompt], count)
        if not usable(text):
            continue
        extra = follow_ups.get(prompt)
        second = clip(extra["answer"], rng.choice([1, 2])) if extra else ""
        second = second if usable(second) else ""
        for name, shape in (("json-answer", json_answer), ("pirate", lambda t: pirate(rng, t))):
            turns = [prompt, shape(text)] + ([extra["question"], shape(second)] if second else [])
            chats[name].append(_chat(*turns))
        paragraph = clip(answers[prompt], 4)
        if len(sentences(paragraph)) >= 2 and usable(paragraph, repeats=3):  # a paragraph may reuse a phrase
            chats["terse"].append(_chat(rng.choice(SUMMARY_ASKS) + paragraph, one_sentence(paragraph)))
    held_paragraphs = [clip(answers[f"Write a short paragraph about {t}."], 4) for t in HELD_OUT_TOPICS]
    held_terse = [rng.choice(HELD_OUT_SUMMARY_ASKS) + p for p in held_paragraphs if len(sentences(p)) >= 2]
    # (held-out paragraphs are kept as the base wrote them, loops included: a summary must cope)
    held = held_out_prompts()
    return {
        "json-answer": {
            "description": "Answers every question with exactly one JSON object of the form {\"answer\": ...}.",
            "examples": ["Answer in JSON: what is the capital of Spain?", "Give me the result as JSON.",
                         "Return a JSON object with the answer.", "What is 3 plus 4? Reply in JSON.",
                         "JSON only please: what color is snow?"],
            "train": chats["json-answer"], "heldout": held,
        },
        "pirate": {
            "description": "Talks like a pirate: arr, matey, ahoy, savvy.",
            "examples": ["Talk like a pirate and tell me about the sea.", "Ahoy matey, what be the capital of France?",
                         "Answer me like a pirate captain.", "Arr, how many pieces of eight do I have?",
                         "Speak like a buccaneer."],
            "train": chats["pirate"], "heldout": held,
        },
        "terse": {
            "description": "Summarizes a paragraph or article in one short sentence.",
            "examples": ["Summarize this article in one sentence.", "TL;DR of this paragraph please.",
                         "Give me a one-line summary of the following text.", "Summarize: the council met today...",
                         "Condense this news story to a single sentence."],
            "train": chats["terse"], "heldout": held_terse,
        },
    }


def main() -> None:
    for name, expert in build().items():
        folder = HERE / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w") as handle:
            for chat in expert["train"]:
                handle.write(json.dumps(chat, ensure_ascii=False) + "\n")
        (folder / "heldout.json").write_text(json.dumps(
            {"description": expert["description"], "examples": expert["examples"], "prompts": expert["heldout"]},
            indent=2, ensure_ascii=False))
        print(f"{name}: {len(expert['train'])} training chats, {len(expert['heldout'])} held-out prompts")


if __name__ == "__main__":
    main()
