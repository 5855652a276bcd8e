"""Scores every expert against a prompt, and the prompt against a background of generic prompts.

Why not one cosine threshold (the first router): a cut that makes off-topic prompts fall back on
one set of experts throws away a quarter of the right answers on another, because how similar
in-domain prompts are to an expert's examples depends on the expert. Here each piece of the
decision is relative, so it carries over to experts and prompts nobody tuned it on:

- **Which expert**: a small linear head (multinomial logistic regression, initialised at the
  experts' centroids) fitted on every expert's examples and description, refitted whenever an
  expert is added, changed or removed. It learns what separates neighbouring experts (SQL vs
  statistics), which nearest-neighbour similarity alone confuses.
- **How well it fits** (`score`): half the mean of the expert's two most similar texts, half the
  similarity to their centroid (one lucky example counts, but not alone).
- **Whether it is off-topic** (`background`): the same kind of similarity to a background class,
  a few hundred generic prompts of every kind shipped in router/data/background.txt. The router
  compares the chosen expert's score with the background's (the margin), so "fits an expert" means
  "fits it better than it fits generic traffic", whatever the expert's own similarity scale.
- **Per-expert calibration**: the background covers cooking and code too; a background prompt
  that an expert would claim as its own (it scores at least CLAIM x the lowest leave-one-out
  score of the expert's own examples) is dropped from the background, so no expert competes
  with generic prompts on its own topic.
- **Tight experts ask for more** (`floor`): an expert whose own examples sit far above the background
  (a fine-tuned skill expert routed by its templated training prompts scores its own kind of prompt
  0.3-0.6 over the background) is not chosen for a prompt that clears the background by a hair. Its
  required margin is at least FLOOR_QUANTILE of its examples' leave-one-out margins minus FLOOR_SLACK;
  for experts with varied hand-written examples that is below the global margin and changes nothing.
- **Operator controls**: `negative_examples` rule an expert out for prompts nearer to them than
  to its examples; a per-expert margin overrides the global one and the floor (router/resolve.py decides).

Settings (CLAIM, the neighbour counts, the head's regularisation, the global margin) were fixed on
loadtests/data/router_set.json; the benchmark reports the sets that were not used for that. The floor's
two settings were fixed on design data alone: router_set.json's experts must keep the global margin, and
the skill experts (training/demo/skills.py) must take their training prompts and give up router_set.json's
prompts, which are off-topic for them (loadtests/bench_moe.py reports unseen prompts).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

NEIGHBOURS = 2  # expert score: mean of the two most similar texts...
CENTROID_SHARE = 0.5  # ...mixed half and half with the similarity to the texts' centroid
BACKGROUND_NEIGHBOURS = 2
CLAIM = 0.9  # a background prompt scoring >= CLAIM x an expert's own level is that expert's topic
HEAD_TEMPERATURE = 10.0  # cosine logits are in [-1, 1]; the head works on 10x that
HEAD_L2 = 0.01
HEAD_STEPS = 100
FLOOR_QUANTILE = 0.25  # of an expert's examples' leave-one-out margins over the background...
FLOOR_SLACK = 0.30  # ...less this is the least margin the expert needs
FLOOR_MIN_EXAMPLES = 4  # fewer examples say too little about how tight the expert is
BACKGROUND_FILE = Path(__file__).resolve().parent / "data" / "background.txt"


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and '#' comments skipped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class ExpertProfile:
    """What routing knows of one expert (from its registry record)."""

    description: str = ""
    examples: tuple[str, ...] = ()
    negative_examples: tuple[str, ...] = ()
    margin: float | None = None  # overrides the router's global margin for this expert

    @classmethod
    def of(cls, record) -> "ExpertProfile":
        """An AdapterRecord's routing metadata."""
        return cls(record.description, record.examples, record.negative_examples, record.router_margin)

    def texts(self) -> list[str]:
        return [t for t in (*self.examples, self.description) if t and t.strip()]


@dataclass(frozen=True)
class ExpertScore:
    expert: str
    score: float  # similarity to the expert's texts (see module docstring)
    probability: float = 1.0  # the head's share for this expert among all experts
    excluded: str = ""  # why the expert cannot be chosen for this prompt (a negative example fits better)
    margin: float | None = None  # the expert's own required margin, when it has one
    floor: float | None = None  # the least margin its own examples' tightness asks for (module docstring)


@dataclass(frozen=True)
class Ranking:
    experts: tuple[ExpertScore, ...]  # most probable first
    background: float  # the prompt's similarity to the generic background


@dataclass
class _Expert:
    profile: ExpertProfile
    positives: torch.Tensor  # [n, D]
    negatives: torch.Tensor | None  # [k, D]
    level: float | None  # lowest leave-one-out score of its examples; None: too few texts to tell
    own: torch.Tensor | None = None  # [n] each example's leave-one-out score (its examples are positives[:n])


def _padded(parts: list[torch.Tensor | None], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, M, D] zero-padded stack (M >= NEIGHBOURS) and [E] row counts."""
    counts = torch.tensor([0 if p is None else p.shape[0] for p in parts])
    out = torch.zeros(len(parts), max(NEIGHBOURS, int(counts.max()) if len(parts) else 0), dim)
    for i, p in enumerate(parts):
        if p is not None:
            out[i, : p.shape[0]] = p
    return out, counts


def _neighbour_mean(sims: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """sims [..., E, M] (padding anywhere past counts) -> mean of each expert's top-min(k, n) sims."""
    valid = torch.arange(sims.shape[-1]) < counts.unsqueeze(-1)
    top = sims.masked_fill(~valid, float("-inf")).topk(k, dim=-1).values
    taken = torch.arange(k) < counts.clamp(min=1).unsqueeze(-1)
    return torch.where(taken, top, torch.zeros(())).sum(-1) / taken.sum(-1)


def _centroids(positives: torch.Tensor) -> torch.Tensor:
    """[E, D] unit centroids of padded expert texts [E, M, D]; padding rows are zero and do not move the sum."""
    return F.normalize(positives.sum(1), dim=-1)


def _expert_scores(queries: torch.Tensor, positives: torch.Tensor, counts: torch.Tensor,
                   centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Q, E] scores of queries [Q, D] against padded expert texts [E, M, D] (module docstring), and the
    nearest-texts part of them alone (what negative examples are compared with)."""
    knn = _neighbour_mean(torch.einsum("qd,emd->qem", queries, positives), counts, NEIGHBOURS)
    return (1 - CENTROID_SHARE) * knn + CENTROID_SHARE * queries @ centroids.T, knn


class _Index:
    """An immutable snapshot of every expert, swapped in whole so a ranking never sees half an update."""

    def __init__(self, experts: dict[str, _Expert], background: torch.Tensor):
        self.names = list(experts)
        entries = list(experts.values())
        dim = background.shape[1]
        self.positives, self.counts = _padded([e.positives for e in entries], dim)
        self.negatives, self.negative_counts = _padded([e.negatives for e in entries], dim)
        self.centroids = _centroids(self.positives)
        self.margins = [e.profile.margin for e in entries]
        self.background = self._unclaimed(background, entries)
        self.floors = [self._floor(e) for e in entries]
        self.weight, self.bias = self._fit_head(entries)

    def scores(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _expert_scores(queries, self.positives, self.counts, self.centroids)

    def _unclaimed(self, background: torch.Tensor, entries: list[_Expert]) -> torch.Tensor:
        levels = torch.tensor([e.level if e.level is not None and e.level > 0 else float("inf") for e in entries])
        claimed = (self.scores(background)[0] >= CLAIM * levels).any(-1)
        return background[~claimed]

    def _floor(self, entry: _Expert) -> float | None:
        """FLOOR_QUANTILE of the expert's examples' leave-one-out margins less FLOOR_SLACK; None: too few
        examples or no background to measure against."""
        if entry.own is None or entry.own.shape[0] < FLOOR_MIN_EXAMPLES or self.background.shape[0] == 0:
            return None
        examples = entry.positives[: entry.own.shape[0]]
        k = min(BACKGROUND_NEIGHBOURS, self.background.shape[0])
        background = (examples @ self.background.T).topk(k, dim=-1).values.mean(-1)
        return float(torch.quantile(entry.own - background, FLOOR_QUANTILE)) - FLOOR_SLACK

    def _fit_head(self, entries: list[_Expert]) -> tuple[torch.Tensor, torch.Tensor]:
        """Multinomial logistic regression over the experts' texts, started at their centroids."""
        weight, bias = self.centroids.clone(), torch.zeros(len(entries))
        if len(entries) < 2:
            return weight, bias
        x = torch.cat([e.positives for e in entries])
        y = torch.cat([torch.full((e.positives.shape[0],), i) for i, e in enumerate(entries)])
        with torch.enable_grad():
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            optimizer = torch.optim.LBFGS([weight, bias], max_iter=HEAD_STEPS)

            def loss():
                optimizer.zero_grad()
                value = F.cross_entropy(HEAD_TEMPERATURE * x @ weight.T + bias, y) + HEAD_L2 * weight.square().sum()
                value.backward()
                return value

            optimizer.step(loss)
        return weight.detach(), bias.detach()

    def rank(self, query: torch.Tensor) -> Ranking:
        q = query.unsqueeze(0)
        scores, own = (x[0] for x in self.scores(q))
        probabilities = (HEAD_TEMPERATURE * q @ self.weight.T + self.bias).softmax(-1)[0]
        ruled_out = torch.zeros(len(self.names), dtype=torch.bool)
        if int(self.negative_counts.max()) > 0:
            negative = _neighbour_mean(torch.einsum("d,ekd->ek", query, self.negatives), self.negative_counts,
                                       NEIGHBOURS)
            ruled_out = (self.negative_counts > 0) & (negative > own)
        background = self.background
        if background.shape[0]:
            top = (background @ query).topk(min(BACKGROUND_NEIGHBOURS, background.shape[0])).values
            background_score = float(top.mean())
        else:
            background_score = float("-inf")
        ranked = [
            ExpertScore(name, float(scores[i]), float(probabilities[i]),
                        "a negative example fits better than its examples" if ruled_out[i] else "",
                        self.margins[i], self.floors[i])
            for i, name in enumerate(self.names)
        ]
        ranked.sort(key=lambda s: (not s.excluded, s.probability), reverse=True)
        return Ranking(tuple(ranked), background_score)


class ExpertClassifier:
    """The router's index of experts. `add`/`remove` re-encode and refit (longer the more experts there are): call them off the event loop. `rank` reads the current snapshot."""

    def __init__(self, encoder, background_prompts: list[str] | None = None):
        self._encoder = encoder
        prompts = read_prompts(BACKGROUND_FILE) if background_prompts is None else background_prompts
        self._background = encoder.encode(prompts) if prompts else None
        self.background_size = len(prompts)
        self._lock = threading.Lock()  # serialises writers; readers take the snapshot reference
        self._experts: dict[str, _Expert] = {}
        self._index: _Index | None = None

    @property
    def encoder_name(self) -> str:
        return getattr(self._encoder, "name", type(self._encoder).__name__)

    def _encode(self, profile: ExpertProfile) -> _Expert | None:
        texts = profile.texts()
        if not texts:
            return None  # nothing to route by: reachable by name only
        positives = self._encoder.encode(texts)
        negatives = [t for t in profile.negative_examples if t and t.strip()]
        level, own = None, None
        n_examples = len(texts) - (1 if profile.description and profile.description.strip() else 0)
        if len(texts) >= 2 and n_examples >= 1:
            # each example scored against the expert without it: how its own prompts score
            levels = []
            for i in range(n_examples):
                rest, count = _padded([torch.cat([positives[:i], positives[i + 1:]])], positives.shape[1])
                levels.append(float(_expert_scores(positives[i: i + 1], rest, count, _centroids(rest))[0][0, 0]))
            level, own = min(levels), torch.tensor(levels)
        return _Expert(profile, positives, self._encoder.encode(negatives) if negatives else None, level, own)

    def add(self, expert: str, profile: ExpertProfile) -> None:
        """(Re)index one expert. Runs the encoder and refits the head."""
        self.add_many({expert: profile})

    def add_many(self, profiles: dict[str, ExpertProfile]) -> None:
        encoded = {name: self._encode(profile) for name, profile in profiles.items()}
        with self._lock:
            for name, entry in encoded.items():
                if entry is None:
                    self._experts.pop(name, None)
                else:
                    self._experts[name] = entry
            self._rebuild()

    def remove(self, expert: str) -> None:
        with self._lock:
            if self._experts.pop(expert, None) is not None:
                self._rebuild()

    def _rebuild(self) -> None:
        if not self._experts:
            self._index = None
            return
        background = self._background if self._background is not None else torch.zeros(0, self._dim())
        self._index = _Index(dict(self._experts), background)

    def _dim(self) -> int:
        return next(iter(self._experts.values())).positives.shape[1]

    def experts(self) -> list[str]:
        with self._lock:
            return list(self._experts)

    def background_kept(self) -> int:
        """How many background prompts no expert claims (the rest are some expert's topic)."""
        index = self._index
        return self.background_size if index is None else int(index.background.shape[0])

    def rank(self, prompt: str) -> Ranking | None:
        """Every expert, most probable first, and the background score; None when no expert is indexed."""
        index = self._index
        if index is None:
            return None
        return index.rank(self._encoder.encode([prompt])[0])

    def rank_many(self, prompts: list[str]) -> list[Ranking | None]:
        """`rank` for several prompts with one encoder call (benchmarks)."""
        index = self._index
        if index is None:
            return [None] * len(prompts)
        vectors = self._encoder.encode(prompts)
        return [index.rank(v) for v in vectors]

