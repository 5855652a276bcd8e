"""Scores every expert against a prompt from the expert's own description and examples.

Each expert is a small set of unit vectors (its examples, and its description when given).
An expert's score for a prompt is the mean of its two best cosine similarities: one
example close to the prompt counts, a single lucky outlier counts less. Cosine similarity
of normalised sentence embeddings means the same for every expert, so one threshold
separates "fits an expert" from "off-topic" (measured by loadtests/bench_router.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from router.encoder import TextEncoder

NEIGHBOURS = 2


@dataclass(frozen=True)
class ExpertScore:
    expert: str
    score: float


class ExpertClassifier:
    def __init__(self, encoder: TextEncoder):
        self._encoder = encoder
        self._lock = threading.Lock()
        self._vectors: dict[str, torch.Tensor] = {}

    def texts_for(self, description: str, examples: list[str] | tuple[str, ...]) -> list[str]:
        return [t for t in (*examples, description) if t and t.strip()]

    def add(self, expert: str, description: str, examples) -> None:
        """(Re)build an expert's vectors; call off the event loop, it runs the encoder."""
        texts = self.texts_for(description, examples)
        vectors = self._encoder.encode(texts) if texts else None
        with self._lock:
            if vectors is None:
                self._vectors.pop(expert, None)  # nothing to route by: reachable by name only
            else:
                self._vectors[expert] = vectors

    def remove(self, expert: str) -> None:
        with self._lock:
            self._vectors.pop(expert, None)

    def experts(self) -> list[str]:
        with self._lock:
            return list(self._vectors)

    def rank(self, prompt: str) -> list[ExpertScore]:
        """Experts by descending score (empty when no expert can be routed to)."""
        with self._lock:
            snapshot = dict(self._vectors)
        if not snapshot:
            return []
        query = self._encoder.encode([prompt])[0]
        scores = []
        for expert, vectors in snapshot.items():
            sims = vectors @ query
            top = sims.topk(min(NEIGHBOURS, sims.numel())).values
            scores.append(ExpertScore(expert, float(top.mean())))
        return sorted(scores, key=lambda s: s.score, reverse=True)
