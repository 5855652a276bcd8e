"""model: "auto" and /v1/route against the real server (experts from the config)."""
import httpx
import pytest

from tests.support.harness import wait_until
from tests.support import BASE, assert_openai_error, post, scrape, value

pytestmark = pytest.mark.integration
PYTHON_QUESTION = "How do I write a Python function that checks whether a list is sorted?"
OFF_TOPIC = "Who was the first emperor of Rome?"


@pytest.fixture(scope="module")
def routed_server(server):
    assert wait_until(lambda: server.health()["router"] == "ready", 120), server.health()
    return server


def chat(server, content, model="auto", headers=None):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    response = post(server, body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def test_auto_routes_to_the_fitting_expert(routed_server):
    response = chat(routed_server, PYTHON_QUESTION)
    assert response.headers["x-expert"] == "alpha"
    assert response.headers["x-router-source"] == "classifier"
    assert float(response.headers["x-router-margin"]) >= -0.10  # over the background, by the server's margin
    assert response.json()["model"] == "alpha"
    assert chat(routed_server, "Give me a simple recipe for a vegetable soup.").headers["x-expert"] == "beta"


def test_off_topic_goes_to_the_fallback_base(routed_server):
    response = chat(routed_server, OFF_TOPIC)
    assert response.headers["x-expert"] == BASE
    assert response.headers["x-router-source"] == "fallback"
    assert "below its margin" in response.headers["x-router-reason"]
    assert float(response.headers["x-router-margin"]) < -0.10


def test_header_and_model_win_over_the_classifier(routed_server):
    assert chat(routed_server, PYTHON_QUESTION, headers={"X-Expert": "beta"}).headers["x-expert"] == "beta"
    by_model = chat(routed_server, PYTHON_QUESTION, model="beta")
    assert by_model.headers["x-expert"] == "beta" and by_model.headers["x-router-source"] == "model"
    assert chat(routed_server, PYTHON_QUESTION, model=BASE).headers["x-router-source"] == "base"


def test_route_endpoint_ranks_without_generating(routed_server):
    before = scrape(routed_server)
    response = httpx.post(routed_server.base_url + "/v1/route", timeout=30, json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PYTHON_QUESTION}],
        "top_k": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["decision"]["expert"] == "alpha" and body["decision"]["source"] == "classifier"
    assert [r["expert"] for r in body["ranking"]] == ["alpha", "beta"]
    assert body["ranking"][0]["score"] > body["ranking"][1]["score"]
    assert body["ranking"][0]["probability"] > 0.5 > body["ranking"][1]["probability"]
    decision = body["decision"]  # the numbers that decided: score - background = margin >= the required one
    assert decision["margin"] == pytest.approx(decision["score"] - decision["background"])
    assert decision["margin"] >= decision["required_margin"] == body["router_margin"] == -0.10
    after = scrape(routed_server)  # nothing was queued, prefilled or generated for it
    for counter in ("loraplex_prompt_tokens_total", "loraplex_generation_tokens_total", "loraplex_requests_total",
                    "loraplex_queue_wait_seconds_count", "loraplex_router_decisions_total"):  # a dry run: not served
        assert value(after, counter) == value(before, counter), counter
    assert_openai_error(httpx.post(routed_server.base_url + "/v1/route", json={"messages": []}), 400)


def test_unknown_expert_header_is_404_even_for_auto(routed_server):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(post(routed_server, body, headers={"X-Expert": "ghost"}), 404, param="X-Expert")
