"""Which expert serves a request, decided in one place, in this order:

1. header `X-Expert` (an adapter name, the base's name, or a mixture `pirate:0.7,terse:0.3`);
2. `model` naming an adapter, or a mixture `pirate+terse` (equal weights); 3. `model` naming the base;
4. `model` = "auto" (or a configured alias): the classifier's head picks the most probable expert
   (skipping any whose negative examples fit the prompt better than its examples); it serves when
   its score beats the background's by the margin (the expert's own `router_margin`, else the
   server's, raised to the floor a tight expert's examples set); otherwise, or with no experts, the
   configured fallback (the base by default) does.
   With `router_top_k` > 1, the top experts that pass their margin are mixed, weighted by a softmax of
   their scores at `router_mix_temperature`.

A mixture's weights are used as given: each expert's delta is scaled by its weight, so `pirate+terse`
(1 each) applies both in full, `pirate:0.5` is pirate at half strength, and a mixture of one expert at
weight 1 is that expert. They must be finite and sum to a positive number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from adapters.registry import AdapterRecord, AdapterRegistry, Viewer, shown
from router.classifier import ExpertClassifier, ExpertScore, Ranking

AUTO_MODEL = "auto"
MAX_WEIGHT = 10.0  # an adapter's delta scaled further than this is noise, not a blend


class UnknownExpert(LookupError):
    """A request named an expert (by `model` or X-Expert) that is neither registered nor the base."""

    def __init__(self, name: str, param: str):
        super().__init__(name)
        self.name = name
        self.param = param  # where the name came from: "model" or "X-Expert"


class BadMixture(ValueError):
    """A mixture that cannot be served (unknown or repeated expert, bad weights, too many experts)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class UnknownMember(BadMixture):
    """A mixture naming an expert that is not registered (an adapter source may still have it: the edge
    fetches it and asks again)."""

    def __init__(self, name: str, param: str):
        super().__init__(f"'{name}' in the mixture is not a registered expert nor the base", param)
        self.name = name


Mixture = tuple[tuple[str, float], ...]  # (expert's ref, weight), heaviest first
# who asks (server/tenants/principal.py's Principal): names are looked up in its namespace, among the experts it
# may use (a tenant: its own and the shared ones); None: all, by ref. An expert it may not use is treated exactly
# as one that is not registered, in every answer below
Visible = Viewer | None


def mixture_label(mixture: Mixture) -> str:
    """`pirate:0.70,terse:0.30`: how X-Expert and the response's `model` name a mixture."""
    return ",".join(f"{name}:{weight:.2f}" for name, weight in mixture)


@dataclass(frozen=True)
class Route:
    expert: str | None  # the registered expert that serves it (its ref: adapters/registry.py); None: the base model
    model: str  # who serves it, as the caller names it (the expert's or the base's): response `model`, X-Expert
    source: str  # header | model | base | classifier | fallback
    score: float | None = None  # the classifier's score for the chosen (or best, when it fell back) expert
    ranking: tuple[ExpertScore, ...] = ()
    reason: str = ""
    background: float | None = None  # the prompt's score against the generic background
    margin: float | None = None  # score - background: what the decision compared with `required`
    required: float | None = None  # the margin the expert needed
    mixture: Mixture = ()  # several experts blended; `expert` is then the heaviest (its defaults apply)
    named: Mixture = ()  # the mixture with its experts as the caller names them (X-Expert, /v1/route)


class ExpertRouter:
    def __init__(self, registry: AdapterRegistry, base_name: str, margin: float, fallback: str | None,
                 auto_names: list[str], max_experts: int = 3, top_k: int = 1, mix_temperature: float = 0.05):
        self.registry = registry
        self.max_experts = max_experts  # per request, in a mixture
        self.top_k = top_k  # experts "auto" mixes (1: it picks one)
        self.mix_temperature = mix_temperature
        self.base_name = base_name
        self.margin = margin
        self.fallback = fallback
        self.auto_names = set(auto_names) | {AUTO_MODEL}
        self.classifier: ExpertClassifier | None = None  # set once the encoder has loaded
        self.unavailable_reason = "the router is loading"

    def needs_classifier(self, model: str, expert_header: str | None) -> bool:
        return not expert_header and model in self.auto_names

    def _record(self, name: str, visible: Visible) -> AdapterRecord | None:
        """The expert the caller means by `name` (in its namespace), if it may use it."""
        return self.registry.lookup(name, visible)

    @staticmethod
    def shown(ref: str, visible: Visible) -> str:
        """How an answer to the caller names the expert `ref` (its own and shared ones by name)."""
        return shown(ref, getattr(visible, "tenant", None))


    def by_name(self, model: str, expert_header: str | None, visible: Visible = None) -> Route:
        if expert_header:
            parts = [part.strip() for part in expert_header.split(",")]
            if len(parts) > 1 or self._weighted(parts[0], visible):
                pairs = [self._weighted(part, visible) or (part, 1.0) for part in parts]
                return self.mixture(pairs, "header", "X-Expert", None, visible)
            return self._named(expert_header, "header", "X-Expert", visible)
        if "+" in model:  # "+" is in no expert's name
            return self.mixture([(name.strip(), 1.0) for name in model.split("+")], "model", "model", model, visible)
        return self._named(model, "model", "model", visible)

    def _weighted(self, part: str, visible: Visible = None) -> tuple[str, float] | None:
        """("pirate", 0.7) for "pirate:0.7"; None for a plain name (names may hold ':', as ft:... do)."""
        if self._known(part, visible):
            return None
        name, colon, weight = part.rpartition(":")
        if not colon:
            return None
        try:
            return name.strip(), float(weight)
        except ValueError:
            return None

    def _known(self, name: str, visible: Visible = None) -> bool:
        return name == self.base_name or self._record(name, visible) is not None

    def mixture(self, pairs: list[tuple[str, float]], source: str, param: str, label: str | None,
                visible: Visible = None) -> Route:
        """The route for (expert, weight) pairs as asked; BadMixture for what cannot be served."""
        if len(pairs) > self.max_experts:
            raise BadMixture(f"a mixture may blend at most {self.max_experts} experts (max_experts_per_request, "
                             f"and no more than max_gpu_adapters); got {len(pairs)}", param)
        names = [name for name, _ in pairs]
        refs = {self.base_name: self.base_name}
        for name in names:
            if not name:
                raise BadMixture("a mixture has an empty expert name", param)
            if name != self.base_name:
                record = self._record(name, visible)
                if record is None:
                    raise UnknownMember(name, param)
                refs[name] = record.ref
        if len({refs[name] for name in names}) != len(names):
            raise BadMixture("a mixture names an expert twice", param)
        if not all(math.isfinite(weight) for _, weight in pairs):
            raise BadMixture("mixture weights must be finite numbers", param)
        if not all(abs(weight) <= MAX_WEIGHT for _, weight in pairs):
            raise BadMixture(f"mixture weights must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}", param)
        total = sum(weight for _, weight in pairs)
        if not total > 0:
            raise BadMixture(f"mixture weights must sum to a positive number; they sum to {total:g}", param)
        asked = sorted(((name, weight) for name, weight in pairs if name != self.base_name and weight != 0),
                       key=lambda p: (-p[1], p[0]))
        if not asked:
            return Route(None, self.base_name, "base")
        blend = tuple((refs[name], weight) for name, weight in asked)
        if len(blend) == 1 and blend[0][1] == 1.0:
            return Route(blend[0][0], asked[0][0], source)  # a mixture of one is that expert, bit for bit
        return Route(blend[0][0], label or mixture_label(tuple(asked)), source, mixture=blend, named=tuple(asked))

    def by_prompt(self, prompt: str, top_k: int | None = None, visible: Visible = None) -> Route:
        """The classifier's choice among the experts the caller may use, or the fallback. Runs the encoder:
        call it off the event loop."""
        if self.classifier is None:
            return self._fallback(Route(None, "", "fallback", reason=self.unavailable_reason), visible)
        return self.decide(self.classifier.rank(prompt), top_k, visible)

    def decide(self, result: Ranking | None, top_k: int | None = None, visible: Visible = None) -> Route:
        """The route for the classifier's ranking of a prompt (None: no expert indexed)."""
        ranking = () if result is None else tuple(s for s in result.experts
                                                  if self.registry.usable(s.expert, visible) is not None)
        if not ranking:
            return self._fallback(Route(None, "", "fallback", reason="no experts to route to"), visible)
        best, background = ranking[0], result.background
        margin = best.score - background
        required = self.required(best)
        best_name = self.shown(best.expert, visible)
        decided = Route(best.expert, best_name, "classifier", best.score, ranking, "", background, margin, required)
        if best.excluded:
            return self._fallback(replace(decided, reason=f"{best_name}: {best.excluded}"), visible)
        if margin < required:
            return self._fallback(replace(decided, reason=f"{best_name} fits {margin:+.3f} over the background, "
                                                         f"below its margin {required:+.3f}"), visible)
        top_k = min(self.top_k if top_k is None else top_k, self.max_experts)
        passing = [s for s in ranking if not s.excluded and s.score - background >= self.required(s)][:top_k]
        if len(passing) < 2:
            return decided
        # a softmax of the scores: experts that fit about as well share, a clearly better one dominates
        top = max(s.score for s in passing)
        raw = [math.exp((s.score - top) / self.mix_temperature) for s in passing]
        blend = tuple(sorted(((s.expert, w / sum(raw)) for s, w in zip(passing, raw)), key=lambda p: (-p[1], p[0])))
        named = tuple((self.shown(ref, visible), weight) for ref, weight in blend)
        return replace(decided, expert=blend[0][0], model=mixture_label(named), mixture=blend, named=named)

    def required(self, score: ExpertScore) -> float:
        """The margin an expert needs: its own router_margin when it has one; else the server's, raised to the
        floor its examples' tightness sets (router/classifier.py)."""
        if score.margin is not None:
            return score.margin
        return self.margin if score.floor is None else max(self.margin, score.floor)

    def _fallback(self, decided: Route, visible: Visible = None) -> Route:
        """The fallback serves; the classifier's numbers (if any) stay on the route for /v1/route and headers."""
        fallback = self._record(self.fallback, visible) if self.fallback else None
        if fallback is not None:
            return replace(decided, expert=fallback.ref, model=self.fallback, source="fallback")
        return replace(decided, expert=None, model=self.base_name, source="fallback")

    def _named(self, name: str, source: str, param: str, visible: Visible = None) -> Route:
        if name == self.base_name:
            return Route(None, self.base_name, "base")
        record = self._record(name, visible)
        if record is not None:
            return Route(record.ref, name, source)
        raise UnknownExpert(name, param)
