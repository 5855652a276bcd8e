"""The prompts the demo experts learn from and are measured on (deterministic, no downloads).

Everyday requests from many topics and phrasings: questions, explanations, advice, how-tos, facts,
short and long, some as a second turn of a conversation. Training prompts and held-out prompts share
neither topics nor phrasings, so the held-out measurement is of the behaviour, not of the templates.
"""
from __future__ import annotations

import random

TOPICS = [
    "volcanoes", "the ocean", "honey bees", "the moon", "rainbows", "electricity", "the internet", "dinosaurs",
    "the Roman Empire", "photosynthesis", "black holes", "earthquakes", "the human heart", "vaccines", "coffee",
    "chocolate", "bread", "cheese", "tea", "olive oil", "rice", "the violin", "jazz", "opera", "hip hop",
    "chess", "football", "basketball", "tennis", "marathons", "yoga", "sleep", "dreams", "memory", "laughter",
    "friendship", "money", "inflation", "taxes", "banks", "the stock market", "recycling", "plastic", "forests",
    "deserts", "glaciers", "rivers", "islands", "mountains", "cities", "trains", "airplanes", "bicycles",
    "cars", "ships", "rockets", "satellites", "robots", "computers", "smartphones", "passwords", "email",
    "books", "poetry", "libraries", "museums", "painting", "photography", "cinema", "theatre", "dancing",
    "gardening", "tomatoes", "roses", "cats", "dogs", "horses", "owls", "sharks", "whales", "ants", "spiders",
    "butterflies", "penguins", "elephants", "the weather", "snow", "lightning", "wind", "the sun", "stars",
    "Mars", "gravity", "magnets", "atoms", "water", "salt", "sugar", "vitamins", "exercise", "running",
    "swimming", "cooking pasta", "baking", "knitting", "camping", "maps", "clocks", "calendars", "languages",
    "writing", "public speaking", "job interviews", "saving money", "moving house", "learning to drive",
]
HELD_OUT_TOPICS = [
    "tides", "the guitar", "thunderstorms", "coral reefs", "submarines", "mushrooms", "origami", "camels",
    "lighthouses", "typewriters", "bridges", "the piano", "kites", "pyramids", "fireflies", "volleyball",
    "comets", "the printing press", "umbrellas", "wolves",
]
QUESTION_TEMPLATES = [
    "What is {t}?", "Tell me about {t}.", "Explain {t} in simple words.", "Why is {t} important?",
    "Give me a fun fact about {t}.", "What should everyone know about {t}?", "How does {t} work?",
    "Can you describe {t}?", "I'm curious about {t}. What can you tell me?", "Teach me something about {t}.",
    "What's interesting about {t}?", "Write a short paragraph about {t}.", "Give me two facts about {t}.",
    "How would you explain {t} to a child?", "what do you know about {t}", "Quick question: what is {t}?",
    "Share your thoughts on {t}.", "Describe {t} in one sentence.", "Is {t} good or bad? Explain.",
    "What are the basics of {t}?", "My friend asked me about {t}. What should I say?",
    "List three things about {t}.", "Give me some advice about {t}.", "What is the history of {t}?",
]
HELD_OUT_TEMPLATES = [
    "Explain how {t} work.", "Give me advice on learning about {t}.", "I've always wondered about {t}.",
    "What would an expert say about {t}?", "Help me understand {t}.",
]
FOLLOW_UPS = ["Can you say more?", "Why is that?", "And what else?", "Give me another example.",
              "Explain that more simply.", "Is that always true?"]
HELD_OUT_EXTRA = ["Explain how tides work.", "Give me advice on learning guitar.", "What is a good breakfast?",
                  "How do I stay focused when studying?", "Why do leaves fall in autumn?"]


def training_prompts(seed: int = 0) -> list[str]:
    """Every topic in several phrasings (the same topic never in all of them)."""
    rng = random.Random(seed)
    prompts = []
    for topic in TOPICS:
        for template in rng.sample(QUESTION_TEMPLATES, 5):
            prompts.append(template.format(t=topic))
    rng.shuffle(prompts)
    return prompts


def held_out_prompts() -> list[str]:
    """50 prompts: held-out topics in held-out phrasings, plus everyday questions from the issue report."""
    rng = random.Random(1)
    pairs = [(t, p) for t in HELD_OUT_TOPICS for p in HELD_OUT_TEMPLATES]
    rng.shuffle(pairs)
    return HELD_OUT_EXTRA + [p.format(t=t) for t, p in pairs[: 50 - len(HELD_OUT_EXTRA)]]
