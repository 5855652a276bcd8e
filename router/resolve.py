"""Which expert serves a request, decided in one place, in this order:

1. header `X-Expert` (an adapter name, or the base's name);
2. `model` naming an adapter; 3. `model` naming the base (no adapter);
4. `model` = "auto" (or a configured alias): the classifier's head picks the most probable expert
   (skipping any whose negative examples fit the prompt better than its examples); it serves when
   its score beats the background's by the margin (the expert's own `router_margin`, else the
   server's); otherwise, or with no experts, the configured fallback (the base by default) does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from adapters.registry import AdapterRegistry
from router.classifier import ExpertClassifier, ExpertScore, Ranking

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
    score: float | None = None  # the classifier's score for the chosen (or best, when it fell back) expert
    ranking: tuple[ExpertScore, ...] = ()
    reason: str = ""
    background: float | None = None  # the prompt's score against the generic background
    margin: float | None = None  # score - background: what the decision compared with `required`
    required: float | None = None  # the margin the expert needed


class ExpertRouter:
    def __init__(self, registry: AdapterRegistry, base_name: str, margin: float, fallback: str | None,
                 auto_names: list[str]):
        self.registry = registry
        self.base_name = base_name
        self.margin = margin
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
            return self._fallback(Route(None, "", "fallback", reason=self.unavailable_reason))
        return self.decide(self.classifier.rank(prompt))

    def decide(self, result: Ranking | None) -> Route:
        """The route for the classifier's ranking of a prompt (None: no expert indexed)."""
        ranking = () if result is None else tuple(s for s in result.experts if self.registry.get(s.expert) is not None)
        if not ranking:
            return self._fallback(Route(None, "", "fallback", reason="no experts to route to"))
        best, background = ranking[0], result.background
        margin = best.score - background
        required = self.margin if best.margin is None else best.margin
        decided = Route(best.expert, best.expert, "classifier", best.score, ranking, "", background, margin, required)
        if best.excluded:
            return self._fallback(replace(decided, reason=f"{best.expert}: {best.excluded}"))
        if margin < required:
            return self._fallback(replace(decided, reason=f"{best.expert} fits {margin:+.3f} over the background, "
                                                         f"below its margin {required:+.3f}"))
        return decided

    def _fallback(self, decided: Route) -> Route:
        """The fallback serves; the classifier's numbers (if any) stay on the route for /v1/route and headers."""
        if self.fallback and self.registry.get(self.fallback) is not None:
            return replace(decided, expert=self.fallback, model=self.fallback, source="fallback")
        return replace(decided, expert=None, model=self.base_name, source="fallback")

    def _named(self, name: str, source: str, param: str) -> Route:
        if name == self.base_name:
            return Route(None, self.base_name, "base")
        if self.registry.get(name) is not None:
            return Route(name, name, source)
        raise UnknownExpert(name, param)
