"""The loop watch (server/engine/loops.py) on token lists: what ends an answer and what does not."""
import random

import pytest

from server.engine.loops import MIN_REPEATS, LoopWatch

PROMPT = [7] * 40  # a prompt that repeats itself: never counted


def first_stop(answer: list[int], min_span: int = 64) -> int | None:
    """The answer's length when the watch ended it, or None."""
    watch, tokens = LoopWatch(min_span), list(PROMPT)
    for generated, token in enumerate(answer, 1):
        tokens.append(token)
        if watch.push(tokens, generated):
            return generated
    return None


def test_a_block_said_over_and_over_ends_once_it_covers_the_span_and_four_copies():
    sentence = list(range(100, 112))  # 12 tokens
    answer = list(range(200, 230)) + sentence * 20
    # the loop starts at token 31; it ends where 64 tokens (more than 4 copies) repeat one block
    assert first_stop(answer) == 30 + 64
    long_block = list(range(300, 340))  # 40 tokens: 4 copies (160) are needed, not 64
    assert first_stop(long_block * 6) == 4 * 40
    assert first_stop([5] * 100) == 64  # one token over and over


def test_text_that_changes_never_ends_and_few_copies_are_not_a_loop():
    rng = random.Random(0)
    assert first_stop([rng.randrange(1000) for _ in range(2000)]) is None
    counting = [t for n in range(300) for t in (10 + n % 97, 1, 2)]  # "1. 2. 3." numbers change
    assert first_stop(counting) is None
    refrain = list(range(100, 130))
    assert first_stop(refrain * (MIN_REPEATS - 1) + list(range(500, 600))) is None
    assert first_stop(list(range(100, 200)) * 3, min_span=64) is None  # a block longer than the watch's periods


def test_the_prompt_is_not_part_of_the_loop():
    assert first_stop([7] * 30) is None  # 40 prompt tokens of 7 then 30 more: the answer alone is 30


def test_the_watch_says_the_loops_period_and_steering_rules_out_its_next_token_unless_nothing_else_is_allowed():
    import torch

    from server.engine.loops import NUDGE_SPAN, steer_off

    watch, tokens, period = LoopWatch(NUDGE_SPAN), list(PROMPT), 0
    for generated, token in enumerate([1, 2] * 20, 1):
        tokens.append(token)
        period = watch.push(tokens, generated)
        if period:
            break
    assert period == 2 and len(tokens) - len(PROMPT) == NUDGE_SPAN and tokens[-period] == 1  # next would be 1
    allow_all = lambda values: values  # noqa: E731  (a format that allows every token)
    steered = steer_off(allow_all, 1, torch.zeros(5))
    assert steered[1] == float("-inf") and torch.isfinite(steered[[0, 2, 3, 4]]).all()
    only_one = lambda values: torch.where(torch.arange(5) == 1, values, float("-inf"))  # noqa: E731
    assert steer_off(only_one, 1, torch.zeros(5))[1] == 0  # the format allows nothing else: kept


def test_a_constrained_answers_run_of_digits_is_counted_in_digits_and_steered_off_as_one_class(tokenizer):
    """digit_widths reads the served tokenizer (SmolLM2 writes one digit a token); the watch counts a run in
    digits and resets on anything else; steering rules out every digit token at once, unless the format
    allows only digits."""
    import torch

    from server.engine.loops import DIGIT_RUN, digit_widths, steer_off

    widths = digit_widths(tokenizer)
    assert sorted(tokenizer.convert_ids_to_tokens(list(widths))) == list("0123456789")
    assert set(widths.values()) == {1}
    digits = tokenizer.encode("1234567890" * 5, add_special_tokens=False)
    letter = tokenizer.encode("x", add_special_tokens=False)
    watch, tokens = LoopWatch(64, digits=widths), list(PROMPT)
    for generated, token in enumerate(digits[:DIGIT_RUN - 1] + letter + digits[:DIGIT_RUN - 1], 1):
        tokens.append(token)
        watch.push(tokens, generated)
        assert not watch.runaway_digits  # 31 digits, a letter, 31 again: never a run of 32
    tokens.append(digits[0])
    watch.push(tokens, len(tokens) - len(PROMPT))
    assert watch.runaway_digits
    for free in (LoopWatch(64), LoopWatch(64, keys=list(range(len(tokenizer))))):  # free text: digits not counted
        for generated, token in enumerate(digits, 1):
            free.push(list(PROMPT) + digits[:generated], generated)
        assert not free.runaway_digits and free.digit_run == 0
    ids = torch.tensor(sorted(widths))
    nudges = []
    steered = steer_off(lambda values: values, ids, torch.zeros(len(tokenizer)), nudged=lambda: nudges.append(1))
    assert torch.isinf(steered[ids]).all() and torch.isfinite(steered).sum() == len(tokenizer) - 10
    only_digits = lambda values: torch.where(torch.isin(torch.arange(len(values)), ids), values, float("-inf"))  # noqa: E731
    kept = steer_off(only_digits, ids, torch.zeros(len(tokenizer)), nudged=lambda: nudges.append(1))
    assert torch.isfinite(kept[ids]).all() and nudges == [1]  # nothing ruled out: not counted


@pytest.fixture(scope="module")
def words(tokenizer):
    """The real tokenizer's words and their lengths, as the engine watches free text by (`text_words`)."""
    from server.engine.loops import text_words

    return text_words(tokenizer)


def text_stop(tokenizer, words, answer: str, twice: bool = True) -> str | None:
    """Free text as the engine watches it: the answer's text up to where the watch ended it, or None.
    `twice=False`: without a long block ending at its second copy (the rule before it)."""
    from server.engine.loops import TEXT_MAX_PERIOD, TEXT_REPEATS, TWICE_CHARS

    ids, (keys, widths) = tokenizer.encode(answer, add_special_tokens=False), words
    watch = LoopWatch(64, TEXT_MAX_PERIOD, keys=keys, repeats=TEXT_REPEATS, twice=TWICE_CHARS if twice else None,
                      widths=widths)
    tokens = list(PROMPT)
    for generated, token in enumerate(ids, 1):
        tokens.append(token)
        if watch.push(tokens, generated):
            return tokenizer.decode(ids[:generated])
    return None


def test_free_text_is_watched_as_words_and_a_long_sentence_said_three_times_ends_it(tokenizer, words):
    """The same sentence after " " and after a blank line is one loop (exact tokens differ: "ĠThe" / "The");
    three copies of a sentence of 22+ words end it, two do not; lists and tables whose words change, code,
    and text of multi-byte characters (whose byte tokens all decode alone to U+FFFD) never end."""
    keys = words[0]
    sentence = "The leaves are changing, and this is a natural process that helps to keep the balance in the whole of the forest."
    assert len(tokenizer.encode(sentence, add_special_tokens=False)) >= 22
    looping = f"Leaves fall in autumn. {sentence} {sentence}\n\n{sentence} {sentence}"
    ended = text_stop(tokenizer, words, looping)
    assert ended is not None and ended.count("The leaves are changing") == 3
    assert text_stop(tokenizer, words, f"Leaves fall. {sentence}\n\n{sentence} Then winter comes, and snow.") is None
    days = "\n".join(f"- {day}: people often {act} with friends after a long and busy week of work at the office."
                     for day, act in zip(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
                                         ["run", "swim", "cook", "read", "dance"]))
    assert text_stop(tokenizer, words, days) is None
    code = "\n".join(f"    def get_{f}(self):\n        return self._{f}\n" for f in ("name", "age", "email", "phone"))
    assert text_stop(tokenizer, words, code) is None
    assert text_stop(tokenizer, words, "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 2 + "白日依山尽，黄河入海流。") is None


def test_a_sentence_coming_back_with_a_word_changed_ends_after_four_copies_and_a_list_does_not(tokenizer, words):
    """Nine words in ten the same as a block before, over four copies: going round with a changing number
    or name, which the exact check never sees as one block. A list whose lines share a template but change
    their item, its detail and their length, and a song's verses around a chorus, are not."""
    keys = words[0]
    going_round = " ".join(f"You can call your mom in {n} minutes and tell her that you love her very much and that "
                           f"you will visit her soon." for n in (10, 15, 20, 25, 30, 35, 40, 45, 50))
    ended = text_stop(tokenizer, words, going_round)
    assert ended is not None and 4 <= ended.count("You can call your mom") <= 6
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate([
        "Preheat the oven to 180 degrees and grease a round cake tin with a little butter.",
        "Mix the flour, the sugar and a pinch of salt in a large bowl until they are well combined.",
        "Beat the eggs with the milk and the melted butter in a jug, then pour them into the bowl.",
        "Stir the batter gently until it is smooth, and scrape it into the tin with a spatula.",
        "Bake the cake for about forty minutes, until a skewer pushed into the middle comes out clean.",
        "Let the cake cool in the tin for ten minutes, then turn it out onto a wire rack to cool."], 1))
    assert text_stop(tokenizer, words, steps) is None
    chorus = "Oh the sea, the sea, the deep blue sea, it calls me home to thee."
    verses = ["The waves roll in upon the sand, the gulls cry out above the land.",
              "A sailor stands upon the deck and watches stars without a speck.",
              "The harbor lights are burning bright, the boats come back into the night.",
              "My heart belongs to ocean spray and to the tide that ebbs away."]
    assert text_stop(tokenizer, words, "\n\n".join(f"{verse}\n{chorus}" for verse in verses)) is None


def test_two_paragraphs_taking_turns_are_one_block_of_over_64_words(tokenizer, words):
    """A paragraph said again with one phrase taking turns ("technology" / "the internet": one word and
    two, so no single paragraph is a period) repeats as a block of two paragraphs, longer than 64 words;
    free text is watched for blocks of up to TEXT_MAX_PERIOD words, and this one, a paragraph's length or
    more, ends with its second copy (its third without that rule)."""
    from server.engine.loops import TEXT_MAX_PERIOD, TEXT_REPEATS

    keys = words[0]
    paragraph = ("In the context of {}, it's a versatile tool that can be used to enhance various aspects of our "
                 "lives, from communication to entertainment and to the way that we learn new things.")
    answer = "\n\n".join(paragraph.format(topic) for topic in ["technology", "the internet"] * 5)
    block = len([t for t in tokenizer.encode("\n\n".join(paragraph.format(t) for t in ["technology", "the internet"]),
                                             add_special_tokens=False) if keys[t] >= 0])
    assert 64 < block <= TEXT_MAX_PERIOD
    ended = text_stop(tokenizer, words, answer)
    assert ended is not None and ended.count("In the context of") == 2 * 2
    ended = text_stop(tokenizer, words, answer, twice=False)
    assert ended is not None and ended.count("In the context of") == 2 * TEXT_REPEATS
    short = LoopWatch(64, keys=keys, repeats=TEXT_REPEATS, near_match=None)  # blocks of at most 64 words
    tokens, ids = list(PROMPT), tokenizer.encode(answer, add_special_tokens=False)
    assert not any(short.push(tokens := tokens + [token], n) for n, token in enumerate(ids, 1))


def test_a_paragraph_said_twice_word_for_word_ends_and_a_sentence_or_a_changed_paragraph_does_not(tokenizer, words):
    """A block of TWICE_CHARS characters or more (two sentences, a paragraph) said again straight after
    itself ends at the end of its second copy (a third would run past a 512-token budget); a sentence said
    twice (a line a song or a "say it again" answer repeats on purpose), the same paragraph with a line
    between, or said again with its details changed, does not."""
    from server.engine.loops import TWICE_CHARS

    keys, widths = words
    size = lambda text: sum(widths[t] for t in tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    paragraph = ("In many cultures, camels are a symbol of the human desire to explore and discover. They are "
                 "often depicted in art and literature, symbolizing the human capacity to explore the unknown "
                 "and seek new experiences. For the people of the desert they were also the way to carry water, "
                 "salt and cloth from one oasis to the next across the wide and open desert.")
    assert size(paragraph) >= 2 * TWICE_CHARS
    twice = f"Camels are fascinating.\n\n{paragraph}\n\n{paragraph}\n\n{paragraph}"
    ended = text_stop(tokenizer, words, twice)
    assert ended is not None and ended.count("In many cultures") == 2 and ended.rstrip(".").endswith("open desert")
    assert text_stop(tokenizer, words, twice, twice=False).count("In many cultures") == 3
    pair = ("Metaphors can help us to convey complex ideas in a more accessible way. However, they can also be "
            "used to create confusion and ambiguity in what we are trying to say.")
    count = len([t for t in tokenizer.encode(pair, add_special_tokens=False) if keys[t] >= 0])
    assert size(pair) >= TWICE_CHARS and count < 64  # two sentences: shorter than the rule before's 64 words
    ended = text_stop(tokenizer, words, f"A metaphor compares two things.\n\n{pair}\n\n{pair}\n\n{pair}")
    assert ended is not None and ended.count("Metaphors can help") == 2
    sentence = ("The leaves are changing colour, and this is a natural process that helps to keep the balance of "
                "life in the forest.")
    assert size(sentence) < TWICE_CHARS
    assert text_stop(tokenizer, words, f"Autumn. {sentence}\n\n{sentence} Then winter comes.") is None
    assert text_stop(tokenizer, words, f"{paragraph}\n\nAnd then:\n\n{paragraph} That is all.") is None
    changed = paragraph.replace("camels", "horses").replace("desert", "steppe").replace("discover", "travel")
    assert text_stop(tokenizer, words, f"{paragraph}\n\n{changed} That is all.") is None
    poem = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"  # 50 tokens, each a "word": a line, not a paragraph
    assert text_stop(tokenizer, words, f"{poem}\n{poem}\n白日依山尽，黄河入海流。") is None
