"""Stops and termination against the real server, through the openai client."""
import openai
import pytest

from tests.conftest import EXPERT_STOP
from tests.support import BASE, ask, assert_openai_error, post

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def full_answer(client, tokenizer):
    """The base's greedy answer with no stop, and its tokens' texts."""
    answer = ask(client, BASE, QUESTION, max_tokens=40).choices[0].message.content
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return answer, [tokenizer.decode([i]) for i in ids]


def stream_text(client, model, question, **kwargs):
    chunks = list(ask(client, model, question, stream=True, stream_options={"include_usage": True}, **kwargs))
    choices = [c.choices[0] for c in chunks if c.choices]
    return [c.delta.content or "" for c in choices], [c.finish_reason for c in choices if c.finish_reason], chunks[-1].usage


def check_stop(client, tokenizer, stop, expected_text, model=BASE, **kwargs):
    """Non-stream and stream both end right before the stop string, and agree."""
    full = ask(client, model, QUESTION, max_tokens=40, stop=stop, **kwargs)
    choice = full.choices[0]
    assert choice.message.content == expected_text
    assert choice.finish_reason == "stop"
    pieces, finishes, usage = stream_text(client, model, QUESTION, max_tokens=40, stop=stop, **kwargs)
    assert "".join(pieces) == expected_text and finishes == ["stop"]
    stops = [stop] if isinstance(stop, str) else (stop or [])
    assert not any(s in piece for piece in pieces for s in stops)
    # usage counts the generated tokens, the one that completed the stop string included
    assert usage.completion_tokens == full.usage.completion_tokens
    assert len(tokenizer.encode(expected_text, add_special_tokens=False)) <= usage.completion_tokens <= 40


def test_stop_string_spanning_two_tokens(client, tokenizer, full_answer):
    answer, pieces = full_answer
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i].strip()) >= 3 and len(pieces[i + 1].strip()) >= 3)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    assert all(stop not in piece for piece in pieces)  # really crosses a token boundary
    check_stop(client, tokenizer, stop, answer[: answer.index(stop)])


def test_stop_string_inside_one_token(client, tokenizer, full_answer):
    answer, pieces = full_answer
    piece = next(p for p in pieces if len(p.strip()) >= 5)
    stop = piece.strip()[1:4]
    check_stop(client, tokenizer, stop, answer[: answer.index(stop)])


def test_list_of_four_stops_cuts_at_the_first_to_complete(client, tokenizer, full_answer):
    answer, _ = full_answer
    stops = ["no such text", "Light", "Paris", "zzz"]
    first = min((answer.index(s) for s in stops if s in answer))
    check_stop(client, tokenizer, stops, answer[:first])


def test_expert_default_stop_applies_and_request_stops_add_to_it(client, tokenizer):
    plain = ask(client, "beta", QUESTION, max_tokens=40).choices[0].message.content
    assert EXPERT_STOP in plain
    check_stop(client, tokenizer, None, plain[: plain.index(EXPERT_STOP)], model="beta-stops")
    check_stop(client, tokenizer, ["France"], plain[: min(plain.index(EXPERT_STOP), plain.index("France"))],
               model="beta-stops")


def test_stop_token_ids_end_the_answer_without_their_text(client, tokenizer, full_answer):
    answer, pieces = full_answer
    ids = tokenizer.encode(answer, add_special_tokens=False)
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k] and pieces[k].strip())
    reply = ask(client, BASE, QUESTION, max_tokens=40, extra_body={"stop_token_ids": [ids[k]]})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == tokenizer.decode(ids[:k])
    assert reply.usage.completion_tokens == k + 1


def test_end_of_turn_token_stops_and_is_not_shown(client):
    reply = ask(client, BASE, QUESTION, max_tokens=100, logprobs=True)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 100
    shown = len(choice.logprobs.content)
    assert reply.usage.completion_tokens == shown + 1  # one token generated, counted, and not shown...
    # ...and it was the template's end of turn: with it ignored, the same greedy run emits it right there
    on = ask(client, BASE, QUESTION, max_tokens=shown + 1, logprobs=True, extra_body={"ignore_eos": True})
    assert on.choices[0].logprobs.content[shown].token == "<|im_end|>"
    assert on.choices[0].message.content.startswith(choice.message.content)


def test_emoji_stream_never_sends_broken_characters(client):
    question = "Reply with five emojis that describe a party."
    pieces, finishes, usage = stream_text(client, BASE, question, max_tokens=30)
    text = "".join(pieces)
    assert any(ord(ch) > 0xFFFF for ch in text)  # the answer really has 4-byte characters
    assert not any(FFFD in piece for piece in pieces)
    assert text == ask(client, BASE, question, max_tokens=30).choices[0].message.content
    assert finishes == ["length"] and usage.completion_tokens == 30


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_that_never_emits_eos_ends_at_exactly_max_tokens(client, stream):
    if stream:
        pieces, finishes, usage = stream_text(client, "noisy", "Tell me a story.", max_tokens=50)
        assert finishes == ["length"] and usage.completion_tokens == 50
    else:
        reply = ask(client, "noisy", "Tell me a story.", max_tokens=50)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 50


def test_default_budget_applies_without_max_tokens(client, server):
    reply = client.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 64  # the server's default_max_tokens


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": {"x": 1}}, "stop"),
        ({"stop_token_ids": [49152]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ],
)
def test_bad_stop_parameters_are_400(server, extra, param):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], **extra}
    error = assert_openai_error(post(server, body), 400)
    assert error["param"].startswith(param)


def test_bad_stop_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError):
        ask(client, BASE, "hi", stop=["1", "2", "3", "4", "5"])
