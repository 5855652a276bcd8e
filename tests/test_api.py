"""The real server (uvicorn subprocess, SmolLM2 NF4, two peft adapters) through the openai client."""
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support.harness import wait_until
from tests.support import BASE, ask, assert_openai_error, post, scrape, shared_decode_steps, value

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about rain.",
    "What is 2 + 2?",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Describe a cat in one sentence.",
    "What do bees make?",
]


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "alpha", "beta", "noisy", "beta-stops", "auto"}
    assert models["alpha"].parent == BASE and models["beta"].parent == BASE
    assert models["auto"].owned_by == "loraplex-router"  # the router's name is discoverable
    assert client.models.retrieve("auto").id == "auto" and client.models.retrieve("alpha").parent == BASE


def test_base_and_adapters_answer_differently(client):
    answers = {model: ask(client, model, QUESTIONS[0]).choices[0].message.content for model in (BASE, "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers
    assert "Paris" in answers[BASE]


def test_response_shape_and_expert_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert raw.headers["x-expert"] == "alpha"
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "alpha"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.completion_tokens <= 5


def test_x_expert_header_wins_over_model(client):
    by_header = client.chat.completions.with_raw_response.create(
        model=BASE, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=16, temperature=0,
        extra_headers={"X-Expert": "beta"},
    )
    assert by_header.headers["x-expert"] == "beta"
    by_model = ask(client, "beta", QUESTIONS[1], max_tokens=16)
    assert by_header.parse().choices[0].message.content == by_model.choices[0].message.content


def test_unknown_expert_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "no-such-expert", "hi")
    assert err.value.body["code"] == "model_not_found"
    response = post(server, {"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Expert": "ghost"})
    assert_openai_error(response, 404, param="X-Expert")


def test_concurrent_mixed_requests_match_their_solo_answers(client, server):
    jobs = [(["alpha", "beta", BASE][i % 3], q) for i, q in enumerate(QUESTIONS)]
    solo = [ask(client, model, q, max_tokens=32).choices[0].message.content for model, q in jobs]
    shared_before = shared_decode_steps(scrape(server))
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(client, *job, max_tokens=32).choices[0].message.content, jobs))
    assert together == solo
    assert shared_decode_steps(scrape(server)) > shared_before  # they really were decoded together


def test_staggered_mixed_adapters_match_their_solo_answers(client, server):
    """Each request joins while the one before is mid-generation (it waits for that one's first token)."""
    jobs = [("alpha", QUESTIONS[0]), ("beta", QUESTIONS[1]), (BASE, QUESTIONS[2]), ("beta", QUESTIONS[6])]
    solo = [ask(client, model, q, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
            for model, q in jobs]
    shared_before = shared_decode_steps(scrape(server))
    texts, started = [None] * len(jobs), [threading.Event() for _ in jobs]

    def run(index):
        model, question = jobs[index]
        chunks = ask(client, model, question, max_tokens=40, stream=True, extra_body={"ignore_eos": True})
        parts = []
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                started[index].set()
                parts.append(chunk.choices[0].delta.content)
        texts[index] = "".join(parts)

    workers = []
    for index in range(len(jobs)):
        if workers:
            assert started[index - 1].wait(60)  # the previous request is decoding: this one joins its batch
        workers.append(threading.Thread(target=run, args=(index,)))
        workers[-1].start()
    for worker in workers:
        worker.join(120)
    assert texts == solo
    assert shared_decode_steps(scrape(server)) > shared_before


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 1234}])
@pytest.mark.parametrize("model", [BASE, "beta"])
def test_stream_joins_to_the_non_stream_answer(client, model, sampling):
    full = ask(client, model, QUESTIONS[2], max_tokens=40, **sampling)
    chunks = list(ask(client, model, QUESTIONS[2], max_tokens=40, stream=True,
                      stream_options={"include_usage": True}, **sampling))
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert content_chunks[-1].choices[0].finish_reason is not None
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-expert"] == BASE
        frames = [line for line in response.iter_lines() if line]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_seed_reproduces_sampled_answer(client):
    def sampled(seed):
        return ask(client, "alpha", QUESTIONS[5], temperature=1.0, seed=seed, max_tokens=20).choices[0].message.content

    first = sampled(7)
    assert sampled(7) == first
    # and the temperature is really applied: other seeds and greedy decoding give other answers
    others = {sampled(seed) for seed in (8, 9, 10)}
    greedy = ask(client, "alpha", QUESTIONS[5], temperature=0, max_tokens=20).choices[0].message.content
    assert len(others | {first}) >= 3 and greedy not in others | {first}


def test_content_parts_roles_and_max_completion_tokens(client, tokenizer):
    completion = client.chat.completions.create(
        model=BASE,
        messages=[
            {"role": "developer", "content": "You answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of Italy?"}]},
            {"role": "assistant", "content": "Let me think."},
            {"role": "user", "content": "Go on."},
        ],
        max_completion_tokens=3,
        temperature=0,
    )
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
    # the parts are joined with a newline and "developer" is the template's "system": the same prompt, token for token
    conversation = [{"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": "What is the capital\nof Italy?"},
                    {"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert completion.usage.prompt_tokens == len(expected)
    plain = client.chat.completions.create(model=BASE, messages=conversation, max_completion_tokens=3, temperature=0)
    assert plain.choices[0].message.content == completion.choices[0].message.content
    assert plain.usage.prompt_tokens == completion.usage.prompt_tokens


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": BASE}, "messages"),
        ({"model": BASE, "messages": []}, "messages"),
        ({"model": BASE, "messages": "hello"}, "messages"),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5},
         "frequency_penalty"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"10000000": 1}},
         "logit_bias"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"hello": 1}}, "logit_bias"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}],
          "tools": [{"type": "function", "function": {"name": "not a name!", "parameters": {}}}]},
         "tools.0.function.name"),
        ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
         "response_format.type"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(server, body, param):
    assert_openai_error(post(server, body), 400, param=param)


def test_malformed_json_is_400(server):
    response = httpx.post(server.base_url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 400)


def test_prompt_plus_max_tokens_over_context_is_400_with_both_numbers(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 390}
    error = assert_openai_error(post(server, body), 400, param="max_tokens")
    assert "390" in error["message"] and "512" in error["message"]


def test_oversized_body_is_413(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_openai_error(post(server, body), 413)


def test_errors_do_not_disturb_a_running_stream(client, server):
    budget = {"max_tokens": 150, "extra_body": {"ignore_eos": True}}
    expected = ask(client, "alpha", QUESTIONS[3], **budget).choices[0].message.content
    result = {}

    def stream():
        chunks = ask(client, "alpha", QUESTIONS[3], stream=True, **budget)
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    worker = threading.Thread(target=stream)
    worker.start()
    assert wait_until(lambda: server.health()["running"] == 1, 30)  # the stream is decoding
    for _ in range(5):
        assert post(server, {"model": BASE, "messages": "bad"}).status_code == 400
        assert post(server, {"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    assert server.health()["running"] == 1  # ... and still was while the errors were answered
    worker.join(120)
    assert result["text"] == expected


def _assert_cancelled(server, before, model):
    """The request left the batch as cancelled, before its 400-token budget: never finished, no tokens counted."""
    assert wait_until(lambda: server.health()["running"] == 0, 30), server.health()
    after = scrape(server)
    assert value(after, "loraplex_requests_total", adapter=model, finish_reason="cancelled") == \
        value(before, "loraplex_requests_total", adapter=model, finish_reason="cancelled") + 1
    assert value(after, "loraplex_generation_tokens_total", adapter=model) == \
        value(before, "loraplex_generation_tokens_total", adapter=model)


def test_stream_disconnect_frees_the_slot(server):
    body = {"model": "beta", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    before = scrape(server)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.health()["running"] == 1
    _assert_cancelled(server, before, "beta")


def test_non_stream_disconnect_frees_the_slot(server):
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 400, "ignore_eos": True}).encode()
    before = scrape(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # hang up once the request is decoding: a sync point, not a guess at how fast 400 tokens are
        assert wait_until(lambda: server.health()["running"] == 1, 30)
    _assert_cancelled(server, before, BASE)


def test_logprobs_describe_each_token_of_the_answer(client):
    completion = ask(client, BASE, QUESTIONS[0], max_tokens=12, logprobs=True, top_logprobs=3)
    choice = completion.choices[0]
    entries = choice.logprobs.content
    shown_tokens = completion.usage.completion_tokens - (choice.finish_reason == "stop")  # the stop token is not shown
    assert len(entries) == shown_tokens > 0
    assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)
    assert ask(client, BASE, QUESTIONS[0], max_tokens=4).choices[0].logprobs is None  # only when asked


def test_streamed_logprobs_equal_the_non_stream_ones(client):
    full = ask(client, "alpha", QUESTIONS[1], max_tokens=16, logprobs=True, top_logprobs=1)
    streamed = []
    for chunk in ask(client, "alpha", QUESTIONS[1], max_tokens=16, logprobs=True, top_logprobs=1, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full.choices[0].logprobs.content]


def test_frequency_penalty_curbs_repetition(client):
    question = "List the numbers from 1 to 15, separated by commas."

    def most_repeated(**penalty) -> int:
        entries = ask(client, BASE, question, max_tokens=40, logprobs=True, **penalty).choices[0].logprobs.content
        return max(sum(1 for e in entries if e.token == token) for token in {e.token for e in entries})

    plain = most_repeated()
    assert most_repeated(frequency_penalty=2.0) < plain < most_repeated(frequency_penalty=-2.0)


def test_logit_bias_forces_and_bans_a_token(client, tokenizer):
    hello = tokenizer.convert_tokens_to_ids("Hello")
    forced = ask(client, BASE, "Hi", max_tokens=3, logit_bias={str(hello): 100})
    assert forced.choices[0].message.content == "HelloHelloHello"
    first = ask(client, BASE, QUESTIONS[0], max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    first_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(first.token))[0]
    banned = ask(client, BASE, QUESTIONS[0], max_tokens=1, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token


def test_plain_text_response_format_is_accepted(client):
    completion = ask(client, BASE, QUESTIONS[1], max_tokens=4, response_format={"type": "text"})
    assert completion.choices[0].message.content


def test_n_choices_are_each_what_a_single_request_gets(client):
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 16}
    single = ask(client, "alpha", QUESTIONS[3], **sampled)
    several = ask(client, "alpha", QUESTIONS[3], n=3, **sampled)
    assert [c.index for c in several.choices] == [0, 1, 2]
    # choice i draws from seed + i, and batching never changes a sequence's tokens
    assert several.choices[0].message.content == single.choices[0].message.content
    assert len({c.message.content for c in several.choices}) > 1
    assert several.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    assert several.usage.completion_tokens > single.usage.completion_tokens
    again = ask(client, "alpha", QUESTIONS[3], n=3, **sampled)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]


def test_n_choices_stream_by_index(client):
    full = ask(client, BASE, QUESTIONS[2], n=2, temperature=0.8, seed=3, max_tokens=20)
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in ask(client, BASE, QUESTIONS[2], n=2, temperature=0.8, seed=3, max_tokens=20, stream=True,
                     stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in full.choices]
    assert finishes == [c.finish_reason for c in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens
