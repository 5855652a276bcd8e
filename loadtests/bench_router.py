"""Routing benchmark (issue 5): does "model": "auto" pick the right expert, and how fast?

    python -m loadtests.bench_router [--threshold 0.45] [--sweep]

Uses loadtests/data/router_set.json: 6 experts, each registered with a description and 5
example prompts, 20 held-out prompts per expert, and 30 off-topic prompts that should go to
the fallback. The router is the server's own (router/), with the embedded MiniLM encoder.
Prints top-1 accuracy, macro-F1, the off-topic -> fallback rate and p50/p99 latency per
routing decision; writes loadtests/results/bench_router.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from adapters.registry import AdapterRecord, AdapterRegistry
from loadtests.provenance import stamp
from loadtests.harness import REPO
from router.classifier import ExpertClassifier
from router.encoder import TextEncoder, embedded_encoder_folder
from router.resolve import ExpertRouter

DATA = Path(__file__).resolve().parent / "data" / "router_set.json"
FALLBACK = "<fallback>"


def build_router(data: dict, threshold: float) -> ExpertRouter:
    registry = AdapterRegistry()
    classifier = ExpertClassifier(TextEncoder(embedded_encoder_folder()))
    for name, expert in data["experts"].items():
        # the registry entry routing needs; no weights are involved in routing
        registry.add(AdapterRecord(name=name, key=name, folder="", source="bench", rank=0, target_modules=(),
                                   nbytes=0, description=expert["description"], examples=tuple(expert["examples"])))
        classifier.add(name, expert["description"], expert["examples"])
    router = ExpertRouter(registry, "base", threshold, None, ["auto"])
    router.classifier = classifier
    return router


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


def evaluate(router: ExpertRouter, data: dict) -> dict:
    latencies_ms, pairs = [], []
    cases = [(label, prompt) for label, e in data["experts"].items() for prompt in e["test"]]
    cases += [(FALLBACK, prompt) for prompt in data["off_topic"]]
    router.by_prompt("warm-up")
    for label, prompt in cases:
        start = time.perf_counter()
        route = router.by_prompt(prompt)
        latencies_ms.append((time.perf_counter() - start) * 1000)
        pairs.append((label, FALLBACK if route.source == "fallback" else route.model))
    on_topic = [(want, got) for want, got in pairs if want != FALLBACK]
    off_topic = [(want, got) for want, got in pairs if want == FALLBACK]
    latencies_ms.sort()
    return {
        "threshold": router.threshold,
        "top1_accuracy": sum(want == got for want, got in on_topic) / len(on_topic),
        "macro_f1": macro_f1(pairs, list(data["experts"])),
        "off_topic_to_fallback": sum(got == FALLBACK for _, got in off_topic) / len(off_topic),
        "latency_ms_p50": statistics.median(latencies_ms),
        "latency_ms_p99": latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))],
        "decisions": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=None, help="default: the server's router_threshold")
    parser.add_argument("--sweep", action="store_true", help="also print accuracy / fallback for other thresholds")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_router.json"))
    args = parser.parse_args()
    from server.settings import Settings

    threshold = Settings().router_threshold if args.threshold is None else args.threshold
    data = json.loads(DATA.read_text())
    router = build_router(data, threshold)
    sweep = []
    if args.sweep:
        for candidate in (-1.0, 0.15, 0.18, 0.21, 0.24, 0.27, 0.30):
            router.threshold = candidate
            r = evaluate(router, data)
            sweep.append({k: r[k] for k in ("threshold", "top1_accuracy", "off_topic_to_fallback")})
            print(f"threshold {candidate:.2f}: top-1 {r['top1_accuracy']:.3f}  off-topic->fallback "
                  f"{r['off_topic_to_fallback']:.3f}")
        router.threshold = threshold
    report = {**stamp("loadtests.bench_router"), **evaluate(router, data), "sweep": sweep}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"threshold {report['threshold']}: top-1 {report['top1_accuracy']:.3f} (goal >= 0.90), macro-F1 "
          f"{report['macro_f1']:.3f}, off-topic -> fallback {report['off_topic_to_fallback']:.3f} (goal >= 0.70), "
          f"latency p50 {report['latency_ms_p50']:.1f} ms p99 {report['latency_ms_p99']:.1f} ms (goal < 15 ms)")


if __name__ == "__main__":
    main()
