"""Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) and check it fits the base.

The result is framework-free: for every (layer, module) pair the adapter touches, a pair of
matrices laid out for `x @ A @ B`, with the LoRA scaling already folded into B, and zero
padded to one rank per adapter so several adapters can be concatenated column-wise.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from validation.unicode import find_unencodable, unencodable_message

# The Llama linears a LoRA may target, and the block each lives in (its path: model.layers.N.<block>.<module>).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
_TENSOR_KEY = re.compile(
    r"layers\.(?P<layer>[0-9]{1,9})\.(?:self_attn|mlp)\.(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # never loaded: unpickling runs code
METADATA_FILE = "expert.json"  # written by `loraplex train` beside the adapter files: description, examples, stop
# Largest |value| of an A matrix or a scaled B matrix that is served. Trained adapters stay
# below ~10 (A ~ 1/sqrt(in), B ~ 1e-2, scaling alpha/r ~ 2); values past this are a broken or
# hostile file that would turn every answer into NaN or noise, so they are refused up front.
MAX_LORA_VALUE = 1e3
MAX_LORA_ALPHA = 1e6
# rank_pattern / alpha_pattern: bounds on what a registration may ask the server to match (_Patterns)
MAX_PATTERN_KEYS = 256
MAX_PATTERN_CHARS = 512
PATTERN_BUDGET_S = 1.0  # all of one adapter's pattern matching, all its modules together


class AdapterError(ValueError):
    """The adapter cannot be served on this base; the message says what to fix."""


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must match: layer count and (in, out) features of each linear."""

    num_layers: int
    linear_features: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, config) -> "BaseShape":
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        inter = config.intermediate_size
        return cls(
            num_layers=config.num_hidden_layers,
            linear_features={
                "q_proj": (hidden, q_out),
                "k_proj": (hidden, kv_out),
                "v_proj": (hidden, kv_out),
                "o_proj": (q_out, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )


def _pad_pair(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [in, r] and B [r, out] zero-padded to `rank`; A @ B is unchanged."""
    pad = rank - a.shape[1]
    if pad == 0:
        return a, b
    return torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))


@dataclass
class LoraWeights:
    rank: int
    # (layer index, module name) -> (A [in, rank], B [rank, out] * scaling)
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.pairs.values())

    def padded_to_rank(self, rank: int) -> "LoraWeights":
        """Zero columns of A and rows of B up to `rank`: the same product, a wider matrix."""
        if rank <= self.rank:
            return self
        padded = {key: _pad_pair(a, b, rank) for key, (a, b) in self.pairs.items()}
        return LoraWeights(rank, padded, self.target_modules, self.base_model_name_or_path)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoraWeights":
        moved = {key: (a.to(device, dtype), b.to(device, dtype)) for key, (a, b) in self.pairs.items()}
        return LoraWeights(self.rank, moved, self.target_modules, self.base_model_name_or_path)


class _Patterns:
    """PEFT's rank_pattern/alpha_pattern (peft.utils.other.get_pattern_key): the first key, taken as a
    regular expression, that matches the end of the module's path (model.layers.3.self_attn.q_proj).

    The keys come from whoever registers an adapter, and a backtracking expression can take minutes
    on even a short path. They are matched with the `regex` library (re's syntax, PEFT's semantics) under
    one shared deadline, and without holding the GIL, so a hostile pattern is refused in bounded time
    while every other thread of the server runs on.
    """

    def __init__(self, field: str, patterns: dict | None, deadline: float):
        self.field = field
        self.deadline = deadline
        self.compiled = [(regex.compile(rf"(.*\.)?({key})$"), value) for key, value in (patterns or {}).items()]

    def value(self, module_path: str, default):
        for pattern, value in self.compiled:
            try:
                found = pattern.match(module_path, timeout=max(self.deadline - time.monotonic(), 1e-3),
                                      concurrent=True)
            except TimeoutError:
                raise AdapterError(f"{self.field} keys took over {PATTERN_BUDGET_S:g} s to match the base's "
                                   "module names (an expression that backtracks); simplify them") from None
            if found:
                return value
        return default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_alpha(value, where: str) -> float:
    if not _is_number(value) or not 0 < abs(value) <= MAX_LORA_ALPHA:
        raise AdapterError(f"{where} must be a finite non-zero number of magnitude at most {MAX_LORA_ALPHA:g}, "
                           f"got {value!r}")
    return float(value)


def _check_rank(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(f"{where} must be a positive integer, got {value!r}")
    return value


def _check_pattern(config: dict, field: str, check) -> None:
    patterns = config.get(field)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise AdapterError(f"{field} must be an object of module pattern -> value, got {type(patterns).__name__}")
    if len(patterns) > MAX_PATTERN_KEYS:
        raise AdapterError(f"{field} has {len(patterns)} keys, over the limit of {MAX_PATTERN_KEYS}")
    for key, value in patterns.items():
        if len(key) > MAX_PATTERN_CHARS:
            raise AdapterError(f"{field} has a key of {len(key)} characters, over the limit of {MAX_PATTERN_CHARS}")
        try:
            regex.compile(rf"(.*\.)?({key})$")
        except (regex.error, RecursionError, OverflowError) as exc:
            raise AdapterError(f"{field} key {key!r} is not a valid pattern: {exc}") from None
        check(value, f"{field}[{key!r}]")


def _check_config_types(config: dict) -> None:
    """Every field we read has the type PEFT writes: a wrong one is the file's fault, said as such."""
    if "r" in config:
        _check_rank(config["r"], "r")
    if "lora_alpha" in config:
        _check_alpha(config["lora_alpha"], "lora_alpha")
    _check_pattern(config, "alpha_pattern", _check_alpha)
    _check_pattern(config, "rank_pattern", _check_rank)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"base_model_name_or_path must be a string, got {type(base).__name__}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError("use_rslora must be true or false")


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    except ValueError:  # json's own limit: an integer of over 4,300 digits
        raise AdapterError(f"{CONFIG_FILE} holds a number too long to be read") from None
    except RecursionError:
        raise AdapterError(f"{CONFIG_FILE} is nested too deeply to be an adapter config") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must be a JSON object")
    location = find_unencodable(config)
    if location is not None:
        raise AdapterError(f"{CONFIG_FILE}: {unencodable_message(location)}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora: true) are not supported; train a plain LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError("LoRA bias terms (bias != 'none') are not supported")
    if config.get("modules_to_save"):
        raise AdapterError("modules_to_save is not supported: the adapter may only hold LoRA matrices")
    _check_config_types(config)
    return config


def _check_values(name: str, tensor: torch.Tensor, scale: float = 1.0) -> None:
    """Finite, and no larger than MAX_LORA_VALUE once multiplied by `scale`: what reaches the model cannot
    overflow it by itself. One pass (aminmax propagates NaN and keeps +-inf), not one per property: on a
    7B-sized adapter the checks were most of what loading it from disk costs."""
    if not tensor.numel():
        return
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AdapterError(f"{name} holds NaN or infinite values")
    largest = max(-low, high) * abs(scale)
    if largest > MAX_LORA_VALUE:
        raise AdapterError(f"{name} holds a value of magnitude {largest:.3g}, over the limit of {MAX_LORA_VALUE:g} "
                           "(a broken or mis-scaled adapter)")


def refuse_pickled(folder: Path) -> None:
    """A folder with only pickled weights gets the one message that says why, wherever it is read."""
    if not (folder / WEIGHTS_FILE).exists() and (folder / PICKLED_WEIGHTS_FILE).exists():
        raise AdapterError(f"{PICKLED_WEIGHTS_FILE} (pickle) is refused; save the adapter as safetensors")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        refuse_pickled(folder)
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc


def _group_pairs(tensors: dict[str, torch.Tensor], base: BaseShape) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.search(key)
        if not match:
            raise AdapterError(f"unsupported tensor {key!r}: only LoRA A/B matrices of {', '.join(LINEAR_MODULES)}")
        layer, module = int(match["layer"]), match["module"]
        if module not in base.linear_features:
            raise AdapterError(f"target module {module!r} does not exist in the base (has {', '.join(LINEAR_MODULES)})")
        if layer >= base.num_layers:
            raise AdapterError(f"tensor {key!r} targets layer {layer}, but the base has {base.num_layers} layers")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterError(f"tensor {key!r} must be a 2-d floating-point matrix, got {tensor.dim()}-d "
                               f"{str(tensor.dtype).removeprefix('torch.')}")
        grouped.setdefault((layer, module), {})[match["ab"]] = tensor
    return grouped


def load_lora(folder: str | Path, base: BaseShape, max_rank: int | None = None) -> LoraWeights:
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config = _read_config(folder)
    grouped = _group_pairs(_read_tensors(folder), base)
    if not grouped:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA matrices")

    default_rank = config.get("r", 8)
    default_alpha = float(config.get("lora_alpha", default_rank))
    alphas = _Patterns("alpha_pattern", config.get("alpha_pattern"), time.monotonic() + PATTERN_BUDGET_S)
    raw_pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (layer, module), ab in sorted(grouped.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module} has lora_{next(iter(ab))} without its partner")
        lora_a, lora_b = ab["A"].float(), ab["B"].float()  # peft: A [r, in], B [out, r]
        in_features, out_features = base.linear_features[module]
        rank = lora_a.shape[0]
        if rank < 1:
            raise AdapterError(f"layer {layer} {module}: LoRA rank is 0 (an empty A matrix)")
        if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
            raise AdapterError(
                f"layer {layer} {module}: LoRA shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit "
                f"the base's {in_features}->{out_features} linear (adapter trained on another base?)"
            )
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        module_path = f"model.layers.{layer}.{block}.{module}"  # the path PEFT matches patterns against
        alpha = float(alphas.value(module_path, default_alpha))
        scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        _check_values(f"layer {layer} {module} lora_A", lora_a)
        _check_values(f"layer {layer} {module} lora_B x scaling ({scaling:g})", lora_b, scaling)
        raw_pairs[(layer, module)] = (lora_a, lora_b, scaling)

    rank = max(a.shape[0] for a, _, _ in raw_pairs.values())
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"adapter rank {rank} exceeds the configured max rank {max_rank}")
    pairs = {
        key: _pad_pair(a.t().contiguous(), (b * scaling).t().contiguous(), rank)  # -> [in, r], [r, out]
        for key, (a, b, scaling) in raw_pairs.items()
    }
    targets = tuple(sorted({module for _, module in pairs}))
    return LoraWeights(rank, pairs, targets, config.get("base_model_name_or_path"))
