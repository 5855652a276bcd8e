"""POST /v1/completions (legacy text completions) on the real server, through the openai client."""
import httpx
import openai
import pytest

from tests.support import BASE, assert_openai_error

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


def complete(client, model=BASE, prompt=PROMPT, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 12)
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def metric(server, name: str) -> float:
    lines = httpx.get(server.base_url + "/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + "{") and 'status="200"' in line)


def test_continues_the_raw_prompt_without_a_chat_template(client, server, tokenizer):
    before = metric(server, "loraplex_requests_total")
    completion = complete(client)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert "Paris" in choice.text and choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT))  # no template around it
    # the same prompt given as token ids continues the same way
    by_ids = complete(client, prompt=tokenizer.encode(PROMPT))
    assert by_ids.choices[0].text == choice.text
    assert metric(server, "loraplex_requests_total") == before + 2


def test_default_budget_is_sixteen_tokens(client):
    completion = client.completions.create(model=BASE, prompt="Once upon a time", temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


def test_experts_and_stops_work_as_in_chat(client):
    base = complete(client, prompt="def fibonacci(n):", max_tokens=24).choices[0].text
    expert = complete(client, model="alpha", prompt="def fibonacci(n):", max_tokens=24)
    assert expert.model == "alpha" and expert.choices[0].text != base
    stopped = complete(client, prompt=PROMPT, stop=[" Paris"], max_tokens=24).choices[0]
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.text


def test_echo_prepends_the_prompt(client):
    plain = complete(client).choices[0].text
    assert complete(client, echo=True).choices[0].text == PROMPT + plain


def test_stream_joins_to_the_non_stream_text(client):
    full = complete(client, max_tokens=20)
    chunks = list(complete(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_legacy_logprobs_line_up_with_the_text(client):
    choice = complete(client, logprobs=3).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3 and top[token] == value == max(top.values())  # greedy


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": ["one", "two"]}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": [10**9]}, 400, "prompt"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
        ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"prompt": "x", "best_of": 2}, 400, "best_of"),
        ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ({}, 400, "prompt"),
        ({"prompt": "x", "model": "no-such-expert"}, 404, "model"),
    ],
)
def test_bad_requests_are_openai_errors(server, body, status, param):
    response = httpx.post(server.base_url + "/v1/completions", json={"model": BASE, **body}, timeout=60)
    assert_openai_error(response, status, param=param)


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt=["a", "b"])


def test_n_completions(client):
    several = complete(client, n=2, temperature=1.0, seed=4, max_tokens=10, logprobs=1)
    assert [c.index for c in several.choices] == [0, 1]
    single = complete(client, temperature=1.0, seed=4, max_tokens=10)
    assert several.choices[0].text == single.choices[0].text
    for choice in several.choices:
        assert "".join(choice.logprobs.tokens) == choice.text and choice.logprobs.text_offset[0] == 0
