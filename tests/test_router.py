"""The router's classifier and decision on the real encoders (MiniLM + WordLlama from their PyPI
packages), without a language model: background class, per-expert claims, the head, negative
examples, per-expert margins, and the labelled sets the benchmark reports."""
import json
from pathlib import Path

import pytest
import torch

from adapters.registry import AdapterRecord, AdapterRegistry
from router.classifier import BACKGROUND_FILE, ExpertClassifier, ExpertProfile, read_prompts
from router.encoder import RouterEncoder
from router.resolve import ExpertRouter
from server.settings import Settings
from training.demo.skills import DESCRIPTIONS, generate

DATA = Path(__file__).resolve().parents[1] / "loadtests" / "data"
EXPERTS = {
    "python-coder": ExpertProfile("Writes, explains and debugs Python code.", (
        "Write a Python function that reverses a string.", "Why does my Python loop raise an IndexError?",
        "How do I read a CSV file with pandas?", "Explain list comprehensions in Python.",
        "What is the difference between a tuple and a list?")),
    "chef": ExpertProfile("Cooking help: recipes, ingredients, techniques and meal ideas.", (
        "Give me a simple recipe for pancakes.", "How long should I boil an egg for a runny yolk?",
        "What can I cook with chicken, rice and broccoli?", "How do I make a tomato sauce from scratch?",
        "What can I use instead of butter when baking?")),
    "gardener": ExpertProfile("Gardening: plants, vegetables, flowers, soil, pests and lawn care.", (
        "When should I plant tomatoes?", "Why are the leaves on my plant turning yellow?",
        "How do I get rid of aphids?", "How often should I mow my lawn?", "What soil do roses like?")),
}


@pytest.fixture(scope="module")
def encoder():
    return RouterEncoder.embedded()


def router_for(encoder, experts=EXPERTS, margin=None, fallback=None):
    registry = AdapterRegistry()
    for name, profile in experts.items():
        registry.add(AdapterRecord(name=name, key=name, folder="", source="test", rank=0, target_modules=(), nbytes=0,
                                   description=profile.description, examples=profile.examples,
                                   negative_examples=profile.negative_examples, router_margin=profile.margin))
    classifier = ExpertClassifier(encoder)
    classifier.add_many({r.name: ExpertProfile.of(r) for r in registry.all()})
    router = ExpertRouter(registry, "base", Settings().router_margin if margin is None else margin, fallback, ["auto"])
    router.classifier = classifier
    return router


def test_both_encoders_load_from_their_packages_and_give_unit_vectors(encoder):
    assert encoder.name == "minilm+wordllama"
    vectors = encoder.encode(["How do I write a bash loop?", "", "  "])
    assert vectors.shape == (3, 384 + 256) and torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_on_topic_prompts_route_and_off_topic_ones_fall_back(encoder):
    router = router_for(encoder)
    for prompt, expert in [("How do I sort a dictionary by value in Python?", "python-coder"),
                           ("What spices go well with lamb?", "chef"),
                           ("My cucumber leaves have white powder on them.", "gardener")]:
        route = router.by_prompt(prompt)
        assert (route.source, route.model) == ("classifier", expert), (prompt, route)
        assert route.margin == pytest.approx(route.score - route.background)
        assert route.margin >= route.required == Settings().router_margin
    for prompt in ["Who was the first emperor of Rome?", "What is the capital of Australia?"]:
        route = router.by_prompt(prompt)
        assert route.source == "fallback" and route.model == "base", (prompt, route)
        assert route.margin < route.required and "below its margin" in route.reason
        assert route.ranking and route.score is not None  # the numbers that decided stay visible


def test_an_expert_claims_the_background_prompts_on_its_own_topic(encoder):
    background = read_prompts(BACKGROUND_FILE)
    assert len(background) >= 300
    classifier = ExpertClassifier(encoder)
    assert classifier.background_kept() == len(background)
    classifier.add("chef", EXPERTS["chef"])
    kept = classifier.background_kept()
    assert 0 < kept < len(background)  # some cooking prompts are the chef's, the rest stay generic
    # a cooking prompt of the background no longer counts against the chef
    route = router_for(encoder, {"chef": EXPERTS["chef"]}).by_prompt("How do I cook pasta?")
    assert route.model == "chef", route
    classifier.remove("chef")
    assert classifier.background_kept() == len(background) and classifier.rank("anything") is None


def test_the_head_tells_neighbouring_experts_apart_and_refits_on_changes(encoder):
    router = router_for(encoder)
    ranking = router.classifier.rank("Why does my pandas merge drop rows?")
    assert ranking.experts[0].expert == "python-coder"
    assert sum(s.probability for s in ranking.experts) == pytest.approx(1.0, abs=1e-4)
    router.classifier.remove("python-coder")
    router.registry.remove("python-coder")
    assert "python-coder" not in [s.expert for s in router.classifier.rank("pandas merge").experts]
    assert router.by_prompt("Why does my pandas merge drop rows?").source == "fallback"


def test_negative_examples_rule_an_expert_out(encoder):
    prompt = "What wine goes well with a mushroom risotto?"
    assert router_for(encoder).by_prompt(prompt).model == "chef"
    chef = EXPERTS["chef"]
    experts = {**EXPERTS, "chef": ExpertProfile(chef.description, chef.examples,
                                               ("Which wine should I pair with dinner?",
                                                "What wine goes with pasta?"))}
    route = router_for(encoder, experts).by_prompt(prompt)
    assert route.model != "chef", route
    chef_score = next(s for s in route.ranking if s.expert == "chef")
    assert chef_score.excluded and route.ranking[-1].expert == "chef"  # ruled out: ranked last, with the reason


def test_a_per_expert_margin_overrides_the_servers(encoder):
    prompt = "Give me a recipe for a quick vegetable curry."
    strict = {**EXPERTS, "chef": ExpertProfile(EXPERTS["chef"].description, EXPERTS["chef"].examples, (), 0.9)}
    route = router_for(encoder, strict).by_prompt(prompt)
    assert route.source == "fallback" and route.required == 0.9 and "chef" in route.reason
    lenient = router_for(encoder, margin=1.0)  # the server's margin refuses everything...
    assert lenient.by_prompt(prompt).source == "fallback"
    eager = {**EXPERTS, "chef": ExpertProfile(EXPERTS["chef"].description, EXPERTS["chef"].examples, (), -1.0)}
    route = router_for(encoder, eager, margin=1.0).by_prompt(prompt)  # ...but the chef's own margin admits it
    assert (route.source, route.model, route.required) == ("classifier", "chef", -1.0)


def test_an_expert_with_tight_examples_asks_for_more_than_the_servers_margin(encoder):
    """A skill expert routed by its templated training prompts (a fine-tuning job given no examples): its own
    examples clear the background by far, so a prompt that only grazes its topic falls back, while its own kind
    of prompt still routes. Experts with varied hand-written examples keep the server's margin."""
    weekday = ExpertProfile(DESCRIPTIONS["weekday"], tuple(i.prompt for i in generate("weekday", "train", 24, 0)))
    router = router_for(encoder, {**EXPERTS, "weekday": weekday})
    margin = Settings().router_margin
    route = router.by_prompt("If today is Wednesday, what day is it 12 days from now?")
    floors = {s.expert: s.floor for s in route.ranking}
    assert route.model == "weekday" and floors["weekday"] > margin + 0.1 and route.required == floors["weekday"]
    assert all(floor is None or floor < margin for name, floor in floors.items() if name != "weekday")
    grazing = router.by_prompt("When is the next bank holiday?")  # weekday's best, but barely over the background
    assert grazing.source == "fallback" and margin < grazing.margin < grazing.required, grazing
    own = {**EXPERTS, "weekday": ExpertProfile(weekday.description, weekday.examples, (), margin)}
    assert router_for(encoder, own).by_prompt("When is the next bank holiday?").model == "weekday"  # its own margin wins


def test_experts_with_one_text_or_none(encoder):
    classifier = ExpertClassifier(encoder)
    classifier.add_many({"desc-only": ExpertProfile("Answers questions about astronomy and the night sky."),
                         "nothing": ExpertProfile()})
    assert classifier.experts() == ["desc-only"]  # no texts: reachable by name only
    ranking = classifier.rank("How far away is the Andromeda galaxy?")
    assert [s.expert for s in ranking.experts] == ["desc-only"] and ranking.experts[0].probability == 1.0


def test_router_threshold_in_a_config_says_what_replaced_it():
    with pytest.raises(ValueError, match="router_margin"):
        Settings(router_threshold=0.21)


def test_the_labelled_sets_are_what_the_benchmark_says():
    """Each evaluation set: >= 6 experts with 5 registered examples and >= 20 test prompts each, >= 30
    off-topic prompts (the category set has none by design), and no prompt shared with the calibration set
    or with the background the router ships."""
    calibration = json.loads((DATA / "router_set.json").read_text())
    seen = {p.lower() for p in read_prompts(BACKGROUND_FILE)}
    seen |= {p.lower() for e in calibration["experts"].values() for p in (*e["examples"], *e["test"])}
    seen |= {p.lower() for p in calibration["off_topic"]}
    sets = sorted(DATA.glob("router_eval_*.json"))
    assert len(sets) >= 4
    for path in sets:
        data = json.loads(path.read_text())
        assert len(data["experts"]) >= 6, path
        for name, expert in data["experts"].items():
            assert len(expert["examples"]) == 5 and len(expert["test"]) >= 20, (path, name)
            assert not set(expert["examples"]) & set(expert["test"]), (path, name)
        assert len(data["off_topic"]) >= 30 or "categories" in path.name, path
        prompts = [p for e in data["experts"].values() for p in e["test"]] + data["off_topic"]
        assert not {p.lower() for p in prompts} & seen, path
