"""POST /v1/router/corrections: an operator fixes misroutes over HTTP; the fix routes the next
request, shows in the registry, and survives a restart. Real app and router in-process (tiny
random Llama for the engine: routing never touches the model)."""
import pytest

from tests.support import assert_openai_error, in_process, write_lora

ADMIN = {"Authorization": "Bearer k"}
GARDENER = {"description": "Gardening: plants, vegetables, flowers, soil and pests.",
            "examples": ["When should I plant tomatoes?", "Why are my plant's leaves turning yellow?",
                         "How do I get rid of aphids?", "What soil do roses like?", "How often should I water basil?"]}
MISROUTED = "My monstera has brown spots, what is wrong with it?"
OFF_TOPIC = "Who painted the ceiling of the Sistine Chapel?"


def route(client, prompt):
    body = client.post("/v1/route", json={"messages": [{"role": "user", "content": prompt}]}).json()
    return body["decision"]


@pytest.fixture
def setup(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "tiny", width=128)
    settings = dict(admin_key=["k"], adapter_roots=[str(roots)], base_mismatch="warn")
    return tiny_folder, tmp_path / "data", roots, settings


def register(client, roots, name, **fields):
    response = client.post("/v1/adapters", json={"name": name, "path": str(roots / "tiny"), **fields}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def correct(client, *pairs, headers=ADMIN):
    return client.post("/v1/router/corrections", headers=headers,
                       json={"corrections": [{"prompt": p, "expert": e} for p, e in pairs]})


def test_corrections_route_the_next_request_show_in_the_registry_and_survive_a_restart(setup):
    tiny_folder, data, roots, settings = setup
    with in_process(tiny_folder, data, **settings) as (state, client):
        base = state.base.name
        register(client, roots, "gardener", **GARDENER)
        register(client, roots, "historian", description="History: wars, empires, revolutions and dates.",
                 examples=["What caused the First World War?", "Who was Charlemagne?",
                           "When did the Roman Empire fall?", "What was the Cold War?",
                           "Why did the French Revolution start?"])
        assert route(client, OFF_TOPIC)["source"] == "fallback"
        response = correct(client, (OFF_TOPIC, "historian"), (MISROUTED, "gardener"))
        assert response.status_code == 200, response.text
        first, second = response.json()["data"]
        assert first["action"] == "example_added" and first["before"]["source"] == "fallback"
        assert first["after"] == {**first["after"], "expert": "historian", "source": "classifier"}
        assert second["action"] in ("example_added", "already_an_example") and second["after"]["expert"] == "gardener"
        assert route(client, OFF_TOPIC)["expert"] == "historian"  # the next request routes the new way
        # the same correction again changes nothing
        assert correct(client, (OFF_TOPIC, "historian")).json()["data"][0]["action"] == "already_an_example"
        # "this should fall back": a negative example for the expert that takes it now
        overreach = "What flowers should I buy for my mother?"  # gift shopping, not gardening
        assert route(client, overreach)["expert"] == "gardener"
        fixed = correct(client, (overreach, base)).json()["data"][0]
        assert fixed["action"] == "negative_example_added" and fixed["changed_expert"] == "gardener"
        assert fixed["after"]["source"] == "fallback"
        assert overreach in client.get("/v1/adapters/gardener", headers=ADMIN).json()["negative_examples"]
        assert correct(client, (overreach, base)).json()["data"][0]["action"] == "already_falls_back"
        shown = client.get("/v1/adapters/historian", headers=ADMIN).json()
        assert OFF_TOPIC in shown["examples"] and len(shown["examples"]) == 6
        assert OFF_TOPIC in state.store.read_manifest()["historian"]["examples"]
    with in_process(tiny_folder, data, **settings) as (state, client):  # a restart keeps what was learnt
        assert route(client, OFF_TOPIC)["expert"] == "historian"
        assert OFF_TOPIC in client.get("/v1/adapters/historian", headers=ADMIN).json()["examples"]
        assert route(client, "What flowers should I buy for my mother?")["source"] == "fallback"


def test_bad_corrections_are_refused_before_anything_changes(setup):
    tiny_folder, data, roots, settings = setup
    adapters = {"from-config": {"path": str(roots / "tiny"), **GARDENER}}
    with in_process(tiny_folder, data, adapters=adapters, **settings) as (state, client):
        register(client, roots, "gardener", **GARDENER)
        assert_openai_error(correct(client, (MISROUTED, "gardener"), headers={}), 401)
        # one unknown name: 404 naming where, and the valid correction beside it is not applied either
        missing = correct(client, (MISROUTED, "gardener"), (MISROUTED, "ghost"))
        assert_openai_error(missing, 404, param="corrections[1].expert")
        assert MISROUTED not in client.get("/v1/adapters/gardener", headers=ADMIN).json()["examples"]
        assert_openai_error(correct(client, (MISROUTED, "from-config")), 400, param="corrections[0].expert")
        for body in ({"corrections": []}, {"corrections": [{"prompt": "", "expert": "gardener"}]},
                     {"corrections": [{"prompt": "x"}]}, {"prompt": "x", "expert": "gardener"},
                     {"corrections": [{"prompt": 3, "expert": "gardener"}]}):
            assert_openai_error(client.post("/v1/router/corrections", json=body, headers=ADMIN), 400)
        assert state.store.read_manifest()["gardener"]["examples"] == GARDENER["examples"]


def test_negative_examples_and_margins_come_from_the_config_and_over_http(setup):
    tiny_folder, data, roots, settings = setup
    wine = "Which wine goes with roast chicken?"
    adapters = {"config-gardener": {"path": str(roots / "tiny"), **GARDENER, "router_margin": 0.9}}
    with in_process(tiny_folder, data, adapters=adapters, **settings) as (state, client):
        strict = route(client, "When should I prune my apple tree?")
        assert strict["source"] == "fallback" and strict["required_margin"] == 0.9  # the config's margin
        files = {"adapter_config": open(roots / "tiny" / "adapter_config.json", "rb"),
                 "adapter_model": open(roots / "tiny" / "adapter_model.safetensors", "rb")}
        form = {"name": "cook", "description": "Cooking: recipes and techniques.",
                "examples": '["How do I roast a chicken?", "Give me a pancake recipe.", "How long do I boil pasta?"]',
                "negative_examples": '["Which wine should I serve with dinner?", "What wine goes with fish?"]',
                "router_margin": "-0.5"}
        created = client.post("/v1/adapters", headers=ADMIN, files=files, data=form)
        assert created.status_code == 201, created.text
        assert created.json()["negative_examples"] == ["Which wine should I serve with dinner?",
                                                      "What wine goes with fish?"]
        assert created.json()["router_margin"] == -0.5
        assert route(client, "How do I roast potatoes?")["expert"] == "cook"
        ranking = client.post("/v1/route", json={"messages": [{"role": "user", "content": wine}]}).json()["ranking"]
        assert next(r for r in ranking if r["expert"] == "cook")["excluded"]  # a negative example fits better
        assert route(client, wine)["expert"] != "cook"
