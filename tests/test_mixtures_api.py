"""Blending experts in one request, on the real server (SmolLM2 with the config's experts), through the
official openai client and plain HTTP: `model: "a+b"`, `X-Expert: a:0.7,b:0.3`, `auto` with router_top_k;
their stops, headers, /v1/route and metrics; and the 400s for what cannot be blended. The math of a
mixture row (against PEFT's weighted "cat" merge): tests/test_model_runner.py."""
import httpx
import openai
import pytest

from tests.support.harness import wait_until
from tests.conftest import EXPERT_STOP
from tests.support import BASE, assert_openai_error, post, scrape, value

pytestmark = pytest.mark.integration
QUESTION = "What is the capital of France?"


def body(model="alpha", content=QUESTION, **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            **extra}


def test_a_mixture_by_model_name_or_header_is_served_and_named(server, client):
    reply = client.chat.completions.with_raw_response.create(
        model="alpha+beta", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
    completion = reply.parse()
    assert completion.model == "alpha+beta" and completion.choices[0].message.content
    assert reply.headers["x-expert"] == "alpha:1.00,beta:1.00"  # each in full
    by_header = post(server, body(BASE), headers={"X-Expert": "beta:0.7, alpha:0.3"})
    assert by_header.status_code == 200, by_header.text
    assert by_header.headers["x-expert"] == "beta:0.70,alpha:0.30"
    assert by_header.headers["x-router-source"] == "header"
    # streamed, with usage, as any request
    chunks = list(client.chat.completions.create(model="alpha+beta", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == completion.choices[0].message.content and chunks[-1].usage.completion_tokens > 0


def test_a_mixture_of_one_expert_at_weight_1_is_that_expert_and_weights_change_the_answer(server):
    alone = post(server, body("alpha", max_tokens=24))
    one = post(server, body(BASE, max_tokens=24), headers={"X-Expert": "alpha:1"})
    assert one.headers["x-expert"] == "alpha"
    assert one.json()["choices"][0]["message"]["content"] == alone.json()["choices"][0]["message"]["content"]
    base = post(server, body(BASE, content="Write one sentence about the sea.", max_tokens=24, seed=1, temperature=1))
    noisy = post(server, body("noisy", content="Write one sentence about the sea.", max_tokens=24, seed=1, temperature=1))
    half = post(server, body(BASE, content="Write one sentence about the sea.", max_tokens=24, seed=1, temperature=1),
                headers={"X-Expert": "noisy:0.5"})  # noisy at half strength
    texts = [r.json()["choices"][0]["message"]["content"] for r in (base, noisy, half)]
    assert half.headers["x-expert"] == "noisy:0.50"
    assert texts[2] not in (texts[0], texts[1])


def test_a_mixture_stops_where_any_of_its_experts_would(server):
    """beta-stops declares a stop string; blended with alpha (which sorts first, so its defaults lead), the
    stop still applies."""
    plain = post(server, body("alpha+beta", max_tokens=40)).json()["choices"][0]["message"]["content"]
    assert EXPERT_STOP in plain
    stopped = post(server, body("alpha+beta-stops", max_tokens=40)).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == plain[: plain.index(EXPERT_STOP)]


def test_auto_with_router_top_k_blends_the_experts_that_pass(server, client):
    assert wait_until(lambda: server.health()["router"] == "ready", 120)
    prompt = "Write a Python function that returns a recipe for pancakes from a list of ingredients."
    route = httpx.post(server.base_url + "/v1/route", timeout=30, json={
        "model": "auto", "messages": [{"role": "user", "content": prompt}], "router_top_k": 2}).json()
    decision = route["decision"]
    assert decision["source"] == "classifier"
    mixture = decision["mixture"]
    assert [m["expert"] for m in mixture] and {m["expert"] for m in mixture} <= {"alpha", "beta"}
    assert abs(sum(m["weight"] for m in mixture) - 1) < 1e-9 and len(mixture) == 2
    assert decision["expert"] == ",".join(f"{m['expert']}:{m['weight']:.2f}" for m in mixture)
    reply = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=8, extra_body={"router_top_k": 2})
    assert reply.headers["x-expert"] == decision["expert"] and reply.parse().model == decision["expert"]
    # without it (router_top_k 1 by default): one expert
    single = httpx.post(server.base_url + "/v1/route", timeout=30, json={
        "model": "auto", "messages": [{"role": "user", "content": prompt}]}).json()["decision"]
    assert single["mixture"] is None and single["expert"] in ("alpha", "beta")


def test_mixed_requests_are_counted_per_member_expert(server):
    before = scrape(server)
    assert post(server, body("alpha+beta")).status_code == 200
    after = scrape(server)
    for expert in ("alpha", "beta"):
        assert value(after, "loraplex_mixture_requests_total", expert=expert) == \
            value(before, "loraplex_mixture_requests_total", expert=expert) + 1
    # the request itself under the one shared label of spelled-out mixtures, never its own model string
    assert value(after, "loraplex_requests_total", adapter="mixture") == \
        value(before, "loraplex_requests_total", adapter="mixture") + 1


@pytest.mark.parametrize("model, header, says", [
    ("alpha+nobody", None, "'nobody' in the mixture is not a registered expert"),
    ("alpha+alpha", None, "names an expert twice"),
    ("alpha+", None, "empty expert name"),
    ("alpha+beta+noisy+beta-stops", None, "at most 3 experts"),
    (BASE, "alpha:nan,beta:1", "must be finite"),
    (BASE, "alpha:1,beta:-1", "sum to a positive number"),
    (BASE, "alpha:0,beta:0", "sum to a positive number"),
    (BASE, "alpha:20", "between -10 and 10"),
    (BASE, "alpha:0.5,ghost:0.5", "'ghost' in the mixture"),
])
def test_mixtures_that_cannot_be_served_are_400_naming_the_problem(server, model, header, says):
    response = post(server, body(model), headers={"X-Expert": header} if header else None)
    assert_openai_error(response, 400, "X-Expert" if header else "model")
    assert says in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "invalid_mixture"


def test_the_openai_client_sees_a_bad_mixture_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="not a registered expert"):
        client.chat.completions.create(model="alpha+nobody", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
