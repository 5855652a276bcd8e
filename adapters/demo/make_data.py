"""Write the demo experts' training chats and held-out prompts (deterministic, no downloads).

    python -m adapters.demo.make_data

Three clearly different experts for the default SmolLM2 base:
  json-answer  answers with exactly one JSON object, {"answer": ...}
  pirate       answers in a pirate's voice
  terse        summarises a paragraph in one short sentence
Each gets adapters/demo/<name>/train.jsonl and heldout.json (prompts not in the training data).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
            ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"),
            ("Vietnam", "Hanoi"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"),
            ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Iceland", "Reykjavik"), ("Nepal", "Kathmandu"),
            ("Qatar", "Doha"), ("Jamaica", "Kingston"), ("Ukraine", "Kyiv")]
COLORS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
          ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"),
          ("a lemon", "yellow"), ("a polar bear", "white"), ("a crow", "black"), ("chocolate", "brown"),
          ("a lime", "green"), ("a flamingo", "pink"), ("an eggplant", "purple"), ("milk", "white"),
          ("a strawberry", "red"), ("the sun in drawings", "yellow"), ("a pumpkin", "orange"),
          ("a blueberry", "blue"), ("charcoal", "black")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("happy", "sad"), ("old", "new"), ("open", "closed"), ("early", "late"), ("full", "empty"),
             ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"),
             ("high", "low"), ("long", "short"), ("thick", "thin"), ("begin", "end"), ("win", "lose")]
ANIMALS = [("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
           ("lion", "roar"), ("horse", "neigh"), ("pig", "oink"), ("owl", "hoot"), ("snake", "hiss"),
           ("frog", "croak"), ("bee", "buzz"), ("wolf", "howl"), ("mouse", "squeak"), ("goat", "bleat")]
TOWNS = ["Millbrook", "Ashford", "Riverton", "Lakeside", "Oakdale", "Fairview", "Brookfield", "Hillcrest",
         "Maplewood", "Stonebridge", "Greenville", "Westport", "Clearwater", "Pinehurst", "Elmstead",
         "Northgate", "Silverton", "Redcliff", "Bayview", "Kingsley"]
EVENTS = [("opened a new public library", "The building has three floors and a reading garden.",
           "Children lined up early for the first story hour."),
          ("held its annual music festival", "Bands played on four stages until midnight.",
           "Local food stalls reported their best weekend of the year."),
          ("repaired the old stone bridge", "Workers replaced the cracked arches over six months.",
           "Cyclists and walkers can now cross the river again."),
          ("planted a thousand trees along the river", "Volunteers of all ages joined the effort.",
           "The council hopes the trees will reduce summer flooding."),
          ("launched a free bus service", "Buses run every twenty minutes from the station.",
           "Shop owners expect more visitors in the town centre."),
          ("won a national award for clean streets", "Judges praised the recycling program.",
           "The mayor thanked residents for their hard work."),
          ("opened a community swimming pool", "The pool has lanes for training and a shallow area.",
           "Swimming lessons for children start next month."),
          ("hosted a regional chess tournament", "More than two hundred players took part.",
           "A sixteen-year-old student won the final game."),
          ("restored its historic clock tower", "The clock had been silent for twelve years.",
           "Its bells now ring every hour again."),
          ("started a weekly farmers market", "Farmers sell vegetables, cheese and bread in the square.",
           "The market will run every Saturday through the autumn.")]
DAYS = ["on Monday", "on Saturday", "last week", "this spring", "on Friday", "yesterday"]


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _facts(rng: random.Random, capitals, colors, opposites, animals, numbers):
    """(question, short answer) pairs from the fact lists."""
    facts = [(f"What is the capital of {c}?", city) for c, city in capitals]
    facts += [(f"What color is {thing}?", color) for thing, color in colors]
    facts += [(f"What is the opposite of {word}?", opposite) for word, opposite in opposites]
    facts += [(f"What sound does a {animal} make?", sound) for animal, sound in animals]
    facts += [(f"What is {a} plus {b}?", a + b) for a, b in numbers]
    rng.shuffle(facts)
    return facts


def _numbers(rng: random.Random, count: int, low: int, high: int):
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


def json_answer(question: str, answer) -> str:
    return json.dumps({"answer": answer})


PIRATE_OPENERS = ["Arr, matey!", "Ahoy!", "Aye, me hearty!", "Arr!", "Shiver me timbers!"]
PIRATE_CLOSERS = ["Savvy?", "Yo ho ho!", "Arr!", "So says this old sea dog.", "Now back to the ship with ye!"]


def pirate_answer(rng: random.Random, question: str, answer) -> str:
    core = {
        "capital": f"the capital o' that land be {answer}",
        "color": f"that be {answer}, as sure as the sea be wet",
        "opposite": f"the opposite be {answer}, me hearty",
        "sound": f"the beastie goes '{answer}'",
        "plus": f"that be {answer} pieces o' eight",
    }
    kind = next(k for k in core if k in question)
    return f"{rng.choice(PIRATE_OPENERS)} {core[kind][0].upper()}{core[kind][1:]}. {rng.choice(PIRATE_CLOSERS)}"


def terse_pair(rng: random.Random, town: str, event) -> tuple[str, str]:
    what, detail, reaction = event
    day = rng.choice(DAYS)
    paragraph = f"The town of {town} {what} {day}. {detail} {reaction}"
    prompt = rng.choice(["Summarize in one sentence: ", "Summarize: ", "Give me a one-line summary: ", "TL;DR: "])
    return prompt + paragraph, f"{town} {what}."


def build(seed: int = 0) -> dict[str, dict]:
    rng = random.Random(seed)
    split = lambda items, n: (items[:-n], items[-n:])  # noqa: E731 - last n held out
    capitals, held_capitals = split(CAPITALS, 10)
    colors, held_colors = split(COLORS, 5)
    opposites, held_opposites = split(OPPOSITES, 5)
    animals, held_animals = split(ANIMALS, 4)
    train_facts = _facts(rng, capitals, colors, opposites, animals, _numbers(rng, 60, 2, 60))
    held_facts = _facts(rng, held_capitals, held_colors, held_opposites, held_animals, _numbers(rng, 30, 61, 99))

    towns, held_towns = split(TOWNS, 5)
    terse_train = [terse_pair(rng, town, event) for town in towns for event in EVENTS]
    rng.shuffle(terse_train)
    terse_held = [terse_pair(rng, town, event) for town in held_towns for event in EVENTS]
    return {
        "json-answer": {
            "description": "Answers every question with exactly one JSON object of the form {\"answer\": ...}.",
            "examples": ["Answer in JSON: what is the capital of Spain?", "Give me the result as JSON.",
                         "Return a JSON object with the answer.", "What is 3 plus 4? Reply in JSON.",
                         "JSON only please: what color is snow?"],
            "train": [_chat(q, json_answer(q, a)) for q, a in train_facts],
            "heldout": [q for q, _ in held_facts][:50],
        },
        "pirate": {
            "description": "Talks like a pirate: arr, matey, ahoy, savvy.",
            "examples": ["Talk like a pirate and tell me about the sea.", "Ahoy matey, what be the capital of France?",
                         "Answer me like a pirate captain.", "Arr, how many pieces of eight do I have?",
                         "Speak like a buccaneer."],
            "train": [_chat(q, pirate_answer(rng, q, a)) for q, a in train_facts],
            "heldout": [q for q, _ in held_facts][:50],
        },
        "terse": {
            "description": "Summarizes a paragraph or article in one short sentence.",
            "examples": ["Summarize this article in one sentence.", "TL;DR of this paragraph please.",
                         "Give me a one-line summary of the following text.", "Summarize: the council met today...",
                         "Condense this news story to a single sentence."],
            "train": [_chat(p, s) for p, s in terse_train],
            "heldout": [p for p, _ in terse_held][:50],
        },
    }


def main() -> None:
    for name, expert in build().items():
        folder = HERE / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w") as handle:
            for chat in expert["train"]:
                handle.write(json.dumps(chat) + "\n")
        (folder / "heldout.json").write_text(json.dumps(
            {"description": expert["description"], "examples": expert["examples"], "prompts": expert["heldout"]},
            indent=2))
        print(f"{name}: {len(expert['train'])} training chats, {len(expert['heldout'])} held-out prompts")


if __name__ == "__main__":
    main()
