"""Routing benchmark: does "model": "auto" pick the right expert on experts and prompts it was
never tuned on, does off-topic traffic fall back, and how fast is a decision?

    python -m loadtests.bench_router

Sets (loadtests/data/router_*.json; each: experts with a description, 5 registered examples and
20 held-out test prompts, plus off-topic prompts that should fall back):
- router_set.json: the calibration set. Every router setting (margin, claim factor, encoder
  weights) was fixed on it, and only on it.
- router_eval_near_miss.json, router_eval_styles.json, router_eval_skills.json,
  router_eval_categories.json: written by different methods (neighbouring domains with
  vocabulary-sharing off-topic prompts; messy registers; task-shaped experts; benchmark-style
  categories with no off-topic). Reported with the settings fixed in advance, never tuned on.

Three routers on each set: loraplex's (server defaults), the same with MiniLM alone (what the
second encoder buys), and v1 (the first router: MiniLM, mean of the two best cosines, one global
threshold 0.21). Latency is per decision through ExpertRouter.by_prompt (encoding included) with
the 8 experts of one set and with 100 experts. Writes loadtests/results/bench_router.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from adapters.registry import AdapterRecord, AdapterRegistry
from tests.support.harness import REPO
from loadtests.provenance import stamp
from router.classifier import ExpertClassifier, ExpertProfile, read_prompts, BACKGROUND_FILE
from router.encoder import RouterEncoder, StaticEncoder, TextEncoder, embedded_encoder_folder, embedded_static_folder
from router.resolve import ExpertRouter

DATA = Path(__file__).resolve().parent / "data"
CALIBRATION = "router_set"
FALLBACK = "<fallback>"
V1_THRESHOLD = 0.21


def load_sets() -> dict[str, dict]:
    names = [CALIBRATION] + sorted(p.stem for p in DATA.glob("router_eval_*.json"))
    return {name: json.loads((DATA / f"{name}.json").read_text()) for name in names}


def registry_for(experts: dict) -> AdapterRegistry:
    registry = AdapterRegistry()
    for name, expert in experts.items():
        # the registry entry routing needs; no weights are involved in routing
        registry.add(AdapterRecord(name=name, key=name, folder="", source="bench", rank=0, target_modules=(),
                                   nbytes=0, description=expert["description"], examples=tuple(expert["examples"])))
    return registry


def build_router(experts: dict, encoder, margin: float, background: list[str]) -> ExpertRouter:
    registry = registry_for(experts)
    classifier = ExpertClassifier(encoder, background)
    classifier.add_many({r.name: ExpertProfile.of(r) for r in registry.all()})
    router = ExpertRouter(registry, "base", margin, None, ["auto"])
    router.classifier = classifier
    return router


class V1Router:
    """The first router, for comparison: mean of the two best cosines per expert, one global threshold."""

    def __init__(self, experts: dict, encoder: TextEncoder):
        self.encoder = encoder
        self.vectors = {name: encoder.encode([*e["examples"], e["description"]]) for name, e in experts.items()}

    def decide(self, prompts: list[str]) -> list[tuple[str, str]]:
        """(classifier's choice, decision after the threshold) per prompt."""
        queries = self.encoder.encode(prompts)
        names = list(self.vectors)
        scores = torch.stack([(queries @ v.T).topk(min(2, v.shape[0]), dim=-1).values.mean(-1)
                              for v in self.vectors.values()], -1)
        best = scores.max(-1)
        return [(names[i], names[i] if s >= V1_THRESHOLD else FALLBACK)
                for s, i in zip(best.values.tolist(), best.indices.tolist())]


def cases(data: dict) -> list[tuple[str, str]]:
    out = [(label, prompt) for label, e in data["experts"].items() for prompt in e["test"]]
    return out + [(FALLBACK, prompt) for prompt in data["off_topic"]]


def macro_f1(pairs: list[tuple[str, str]], labels: list[str]) -> float:
    scores = []
    for label in labels:
        tp = sum(1 for want, got in pairs if want == label and got == label)
        fp = sum(1 for want, got in pairs if want != label and got == label)
        fn = sum(1 for want, got in pairs if want == label and got != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def score(data: dict, decisions: list[tuple[str, str]]) -> dict:
    """decisions: per case, (the classifier's top choice, what served: an expert or FALLBACK)."""
    labelled = cases(data)
    on = [(want, top, got) for (want, _), (top, got) in zip(labelled, decisions) if want != FALLBACK]
    off = [got for (want, _), (_, got) in zip(labelled, decisions) if want == FALLBACK]
    return {
        "routed_right": sum(want == got for want, _, got in on) / len(on),
        "off_topic_to_fallback": sum(got == FALLBACK for got in off) / len(off) if off else None,
        "top1_no_fallback": sum(want == top for want, top, _ in on) / len(on),
        "macro_f1": macro_f1([(want, got) for (want, _), (_, got) in zip(labelled, decisions)],
                             list(data["experts"])),
        "experts": len(data["experts"]),
        "test_prompts": len(on),
        "off_topic_prompts": len(off),
    }


def loraplex_decisions(router: ExpertRouter, data: dict) -> list[tuple[str, str]]:
    prompts = [prompt for _, prompt in cases(data)]
    out = []
    for prompt, ranking in zip(prompts, router.classifier.rank_many(prompts)):
        route = router.decide(ranking)
        out.append((ranking.experts[0].expert, FALLBACK if route.source == "fallback" else route.model))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(router: ExpertRouter, prompts: list[str]) -> dict:
    router.by_prompt("warm-up")
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        router.by_prompt(prompt)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 0.99), "decisions": len(times)}


def hundred_experts(sets: dict[str, dict]) -> dict:
    """100 experts from every set's experts: each real one, then copies registered with 5 of its own test
    prompts as examples (different texts, same topic), until there are 100."""
    real = [(f"{set_name}/{name}", e) for set_name, data in sets.items() for name, e in data["experts"].items()]
    experts, rng, round_ = {}, random.Random(0), 0
    while len(experts) < 100:
        for name, e in real:
            if len(experts) == 100:
                break
            examples = e["examples"] if round_ == 0 else rng.sample(e["test"], 5)
            experts[f"{name}#{round_}"] = {"description": e["description"], "examples": examples, "test": e["test"]}
        round_ += 1
    return experts


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margin", type=float, default=None, help="default: the server's router_margin")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_router.json"))
    args = parser.parse_args()
    from server.settings import Settings

    torch.set_num_threads(max(1, torch.get_num_threads()))
    margin = Settings().router_margin if args.margin is None else args.margin
    sets = load_sets()
    background = read_prompts(BACKGROUND_FILE)

    before = rss_mib()
    minilm = TextEncoder(embedded_encoder_folder())
    after_minilm = rss_mib()
    static = StaticEncoder(embedded_static_folder())
    after_static = rss_mib()
    joint, alone = RouterEncoder(minilm, static), RouterEncoder(minilm, None)
    probe = [p for _, p in cases(sets[CALIBRATION])]
    encode_ms = {}
    for label, encoder in (("minilm", minilm), ("wordllama", static)):
        times = []
        for prompt in probe:
            start = time.perf_counter()
            encoder.encode([prompt])
            times.append((time.perf_counter() - start) * 1000)
        encode_ms[label] = {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 0.99)}

    report = {**stamp("loadtests.bench_router"), "router_margin": margin, "calibration_set": CALIBRATION,
              "background_prompts": len(background), "sets": {}}
    for name, data in sets.items():
        row = {"about": data.get("about", ""), "used_for_settings": name == CALIBRATION}
        router = build_router(data["experts"], joint, margin, background)
        row["loraplex"] = score(data, loraplex_decisions(router, data))
        row["loraplex"]["background_kept"] = router.classifier.background_kept()
        row["minilm_only"] = score(data, loraplex_decisions(build_router(data["experts"], alone, margin, background),
                                                            data))
        row["v1"] = score(data, V1Router(data["experts"], minilm).decide([p for _, p in cases(data)]))
        report["sets"][name] = row
        r, v = row["loraplex"], row["v1"]
        off = "-" if r["off_topic_to_fallback"] is None else f"{r['off_topic_to_fallback']:.3f}"
        print(f"{name:26s} routed right {r['routed_right']:.3f} (v1 {v['routed_right']:.3f})  off-topic -> fallback "
              f"{off}  top-1 {r['top1_no_fallback']:.3f}  MiniLM alone {row['minilm_only']['routed_right']:.3f}")

    eight = next(data for data in sets.values() if len(data["experts"]) == 8)
    prompts = [p for _, p in cases(eight)]
    report["latency_8_experts"] = latency(build_router(eight["experts"], joint, margin, background), prompts)
    experts = hundred_experts(sets)
    start = time.perf_counter()
    big = build_router(experts, joint, margin, background)
    report["index_100_experts_s"] = time.perf_counter() - start
    report["latency_100_experts"] = latency(big, prompts)
    start = time.perf_counter()
    big.classifier.add("one-more", ExpertProfile("A newly registered expert.", ("an example", "another example")))
    report["add_one_expert_to_100_ms"] = (time.perf_counter() - start) * 1000
    report["encode_ms"] = encode_ms
    report["memory_mib"] = {"minilm": after_minilm - before, "wordllama": after_static - after_minilm}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    l8, l100 = report["latency_8_experts"], report["latency_100_experts"]
    print(f"latency p50/p99: 8 experts {l8['p50_ms']:.1f}/{l8['p99_ms']:.1f} ms (goal p99 < 15), 100 experts "
          f"{l100['p50_ms']:.1f}/{l100['p99_ms']:.1f} ms (goal < 30); adding an expert to 100: "
          f"{report['add_one_expert_to_100_ms']:.0f} ms; memory MiniLM {report['memory_mib']['minilm']:.0f} MiB, "
          f"WordLlama {report['memory_mib']['wordllama']:.0f} MiB")


if __name__ == "__main__":
    main()
