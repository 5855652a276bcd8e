"""Which expert serves a request, decided in one place, in this order:

1. header `X-Expert` (an adapter name, or the base's name);
2. `model` naming an adapter; 3. `model` naming the base (no adapter);
4. `model` = "auto" (or a configured alias): the classifier picks the expert whose
   description/examples fit the prompt best; below the threshold, or with no experts, the
   configured fallback (the base by default) serves it.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.registry import AdapterRegistry
from router.classifier import ExpertClassifier, ExpertScore

AUTO_MODEL = "auto"


class UnknownExpert(LookupError):
    """A request named an expert (by `model` or X-Expert) that is neither registered nor the base."""

    def __init__(self, name: str, param: str):
        super().__init__(name)
        self.name = name
        self.param = param  # where the name came from: "model" or "X-Expert"


@dataclass(frozen=True)
class Route:
    expert: str | None  # the registered expert that serves it; None: the base model, no LoRA
    model: str  # who serves it by name (the expert's or the base's): response `model`, X-Expert, metrics label
    source: str  # header | model | base | classifier | fallback
    score: float | None = None  # the classifier's score for the chosen expert
    ranking: tuple[ExpertScore, ...] = ()
    reason: str = ""


class ExpertRouter:
    def __init__(self, registry: AdapterRegistry, base_name: str, threshold: float, fallback: str | None,
                 auto_names: list[str]):
        self.registry = registry
        self.base_name = base_name
        self.threshold = threshold
        self.fallback = fallback
        self.auto_names = set(auto_names) | {AUTO_MODEL}
        self.classifier: ExpertClassifier | None = None  # set once the encoder has loaded
        self.unavailable_reason = "the router is loading"

    def needs_classifier(self, model: str, expert_header: str | None) -> bool:
        return not expert_header and model in self.auto_names

    def by_name(self, model: str, expert_header: str | None) -> Route:
        if expert_header:
            return self._named(expert_header, source="header", param="X-Expert")
        return self._named(model, source="model", param="model")

    def by_prompt(self, prompt: str) -> Route:
        """The classifier's choice, or the fallback. Runs the encoder: call it off the event loop."""
        if self.classifier is None:
            return self._fallback(None, (), self.unavailable_reason)
        ranking = tuple(self.classifier.rank(prompt))
        ranking = tuple(s for s in ranking if self.registry.get(s.expert) is not None)
        if not ranking:
            return self._fallback(None, (), "no experts to route to")
        best = ranking[0]
        if best.score < self.threshold:
            return self._fallback(best.score, ranking, f"best score {best.score:.3f} < threshold {self.threshold}")
        return Route(best.expert, best.expert, "classifier", best.score, ranking)

    def _fallback(self, score: float | None, ranking, reason: str) -> Route:
        if self.fallback and self.registry.get(self.fallback) is not None:
            return Route(self.fallback, self.fallback, "fallback", score, ranking, reason)
        return Route(None, self.base_name, "fallback", score, ranking, reason)

    def _named(self, name: str, source: str, param: str) -> Route:
        if name == self.base_name:
            return Route(None, self.base_name, "base")
        if self.registry.get(name) is not None:
            return Route(name, name, source)
        raise UnknownExpert(name, param)
