"""Server settings: defaults < YAML config file < LORAPLEX_* environment < CLI flags.

Pydantic validates the merged result once, so a bad value anywhere gives one clear
message instead of a traceback from deep inside the engine.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models.base_model import EMBEDDED_BASE, default_cache_dir
from validation.schema import EncodableText

ENV_PREFIX = "LORAPLEX_"
log = logging.getLogger("loraplex.settings")


class ConfigError(Exception):
    """A configuration problem worth a one-line message and a non-zero exit."""


class AdapterSpec(EncodableText):
    """An expert to load at start: where its files are plus metadata for routing and stops."""

    model_config = ConfigDict(extra="forbid")

    path: str
    description: str = Field("", description="What the expert is for; the router reads it.")
    examples: list[str] = Field(default_factory=list, description="Typical prompts for this expert (the router's "
                                                                  "training data: 5 or more is best).")
    negative_examples: list[str] = Field(
        default_factory=list, description="Prompts that must not go to this expert (the router rules it out for "
                                          "prompts nearer to these than to its examples).")
    router_margin: float | None = Field(
        None, ge=-1.0, le=1.0, description="This expert's own routing margin; default the server's router_margin "
                                           "(higher: it is chosen less readily).")
    stop: list[str] = Field(default_factory=list, description="Stop strings this expert always uses.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra tokens that end this expert's turn.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default when a request gives none.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


# `source` values of experts that did not come from an adapter source: no source may take one of these names
NON_SOURCE_ORIGINS = frozenset({"config", "path", "upload", "mixture", "fine-tune"})


class _SourceSpec(EncodableText):
    """What every entry of `adapter_sources` says: its name and the model names it may resolve."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
                      description="Names this source in metrics labels and in the `source` of the experts it brings.")
    patterns: list[str] = Field(
        min_length=1,
        description="Model names this source may resolve, as shell patterns ('acme/*', 'sql-*'; '*' also crosses "
                    "'/'). A name no source's patterns match is a plain 404: nothing is asked of any source.")

    @field_validator("name")
    @classmethod
    def _not_a_registration_kind(cls, name: str) -> str:
        if name in NON_SOURCE_ORIGINS:
            raise ValueError(f"'{name}' is what experts registered another way are called; name the source otherwise")
        return name

    @field_validator("patterns")
    @classmethod
    def _patterns_name_something(cls, patterns: list[str]) -> list[str]:
        if any(not p.strip() for p in patterns):
            raise ValueError("a pattern must not be empty")
        return patterns


class FolderSourceSpec(_SourceSpec):
    kind: Literal["folder"]
    path: str = Field(description="The folder tree: model name 'team/x' is the adapter folder <path>/team/x/.")


class S3SourceSpec(_SourceSpec):
    kind: Literal["s3"]
    bucket: str = Field(min_length=1, description="The bucket: model name 'team/x' is s3://<bucket>/<prefix>team/x/.")
    prefix: str = Field("", description="Key prefix of the adapters in the bucket.")
    endpoint_env: str | None = Field(None, description="Name of the environment variable holding the endpoint URL "
                                                       "(an S3-compatible server); unset: AWS's endpoint.")
    region_env: str | None = Field(None, description="Name of the environment variable holding the region.")
    access_key_env: str | None = Field(None, description="Name of the environment variable holding the access key "
                                                         "id; unset: boto3's credential chain (AWS_*, ~/.aws, roles).")
    secret_key_env: str | None = Field(None, description="Name of the environment variable holding the secret key.")
    session_token_env: str | None = Field(None, description="Name of the environment variable holding a session "
                                                            "token, if any.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "path", description="'path' (bucket in the URL path) suits most S3-compatible servers; 'virtual' AWS.")

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> "S3SourceSpec":
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("give access_key_env and secret_key_env together (or neither: boto3's own chain)")
        return self


class HubSourceSpec(_SourceSpec):
    kind: Literal["huggingface"]
    namespace: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
                           description="The Hub user or organization: model name '<namespace>/<repo>' (or "
                                       "'<namespace>/<repo>/<subfolder>') is read from that repository.")
    revision: str = Field("main", min_length=1, description="Branch, tag or commit of every repository.")
    cache_dir: str | None = Field(None, description="huggingface_hub's cache; unset: HF_HUB_CACHE (~/.cache/"
                                                    "huggingface/hub). With HF_HUB_OFFLINE=1 only this cache is read.")
    token_env: str | None = Field(None, description="Name of the environment variable holding a Hub token "
                                                    "(private repositories); unset: huggingface_hub's own (HF_TOKEN).")
    endpoint_env: str | None = Field(None, description="Name of the environment variable holding a Hub mirror's "
                                                       "URL; unset: huggingface_hub's (HF_ENDPOINT).")


AdapterSourceSpec = Annotated[Union[FolderSourceSpec, S3SourceSpec, HubSourceSpec], Field(discriminator="kind")]


class Settings(EncodableText):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "router_threshold" in values:
            raise ValueError("router_threshold was replaced by router_margin: the router now compares the best "
                             "expert with a background of generic prompts, not with one cosine cut (README, Routing)")
        return values

    base_model: str = Field(
        EMBEDDED_BASE,
        description="A local Hugging Face Llama folder, or 'embedded:smollm2' for the bundled default.",
    )
    served_model_name: str | None = Field(None, description="Name clients use for the base; defaults to the folder name.")
    quantization: Literal["auto", "int4", "nf4", "int8", "none"] = Field(
        "auto",
        description="The base's weights. auto: int4 on a CPU, nf4 on CUDA. int4 (CPU only): 4-bit groups, the "
                    "embedded GGUF's own Q4_1 blocks as they are, run by our AVX-512 BF16 kernel (built on first "
                    "use with g++) or else PyTorch's CPU kernel (models/cpu_int4.py). "
                    "nf4 / int8: bitsandbytes (on a CPU, nf4 is several times slower than int4). none: the "
                    "compute dtype. Fine-tuning always trains on nf4 (peft needs bitsandbytes' layers).",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="'auto' picks cuda when present, else cpu.")
    max_batch_size: int = Field(
        16, ge=1, le=1024,
        description="Requests decoded together. KV memory is not reserved per row, so this can be large.",
    )
    kv_cache_memory: str = Field(
        "auto",
        description="KV cache pool size: bytes ('2GiB', '512MiB', 1073741824), a fraction of free memory "
                    "('0.9': of free device memory on CUDA, of available RAM on CPU), or 'auto' (CUDA: 0.9; "
                    "CPU: max_batch_size x context_window tokens, at most a quarter of available RAM).",
    )
    kv_cache_tokens: int | None = Field(
        None, ge=16,
        description="KV cache pool size in token positions (all requests together); overrides kv_cache_memory. On "
                    "a CPU the pool's memory becomes resident only as blocks are first used.",
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="The KV cache's dtype. auto: bfloat16 on a CPU with AVX-512 BF16 or AMX (half the memory), "
                    "else the compute dtype.",
    )
    kv_block_size: Literal[8, 16, 32, 64] = Field(16, description="Token positions per KV cache block.")
    max_step_tokens: int = Field(
        512, ge=16,
        description="Most tokens one engine step computes (decode rows plus prompt chunks); a longer prompt is "
                    "prefilled over several steps while running streams keep decoding.",
    )
    max_step_slowdown: float = Field(
        2.0, ge=0,
        description="While streams decode, a prompt chunk is sized (from measured step times) so that a step "
                    "takes at most about this many times a decode-only step; 0 or 1: chunks fill max_step_tokens.",
    )
    background_slowdown: float = Field(
        1.1, ge=0,
        description="While requests of the best priority decode, lower-priority ones (batch lines) get only the rows "
                    "and prompt tokens that keep a step under about this many times those requests' own step "
                    "(what a row costs is measured as the engine runs: on a GPU extra rows are nearly free, on a "
                    "small CPU they are not). 0 or 1: lower-priority work fills every free row.",
    )
    prefix_caching: bool = Field(True, description="Reuse the KV of prompt prefixes already computed (same adapter).")
    batch_invariant: bool = Field(
        True,
        description="CPU: each adapter's rows in the LoRA step are padded to 4, so a request's logits are "
                    "bit-identical whatever it is batched with (quantized base). false: a lone stream on an "
                    "expert decodes ~10% faster, and a request may differ in the last bits between batches (a "
                    "near-tie can then flip a greedy token). No effect on CUDA, where GEMMs are not batch-invariant.",
    )
    attention: Literal["auto", "kernel", "torch"] = Field(
        "auto",
        description="How decode rows attend on a CPU. kernel: a C++ AVX-512 kernel reads each row's keys and "
                    "values in the paged cache where they lie, up to the row's own length (built on first use, "
                    "about 10 s, with g++). torch: each row's blocks gathered into a padded copy, then matmuls. "
                    "auto: the kernel where the CPU has AVX-512 and it builds, torch otherwise (logged). No effect "
                    "on CUDA. Both keep a request's tokens independent of what it is batched with.",
    )
    lora_kernels: Literal["auto", "torch", "triton", "cpu"] = Field(
        "auto",
        description="How a step computes its rows' LoRA deltas. torch: adapters packed into a step stack, "
                    "batched matmuls (batch-invariant on CPU). cpu: a C++ AVX-512 kernel reads the same stack and "
                    "computes each row's own adapters only (built on first use with g++; float32 compute). triton: Triton shrink/expand kernels read each "
                    "row's adapter from its slot (no stack copies when the set of adapters changes); needs the "
                    "triton package, and runs interpreted (very slow) without a GPU. auto: triton on CUDA when "
                    "it is installed and its start-up self-check passes; on a CPU, cpu where it builds; torch otherwise.",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on CUDA, decode-only steps are captured as CUDA graphs (one per batch-size and "
                    "key-length bucket, on first use) and replayed, cutting the host's per-launch cost; a "
                    "capture that fails or a replay that differs from the eager step turns them off with a "
                    "warning. Never used on CPU. off: every step runs eagerly.",
    )
    max_queued_requests: int = Field(256, ge=0)
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_limit: int = Field(2048, ge=1, description="Upper bound on a request's max_tokens.")
    context_window: int = Field(2048, ge=16, description="Prompt plus completion tokens per request.")
    max_request_bytes: int = Field(1_000_000, ge=1024)
    structured_max_string_length: int = Field(
        256, ge=0,
        description="Constrained output (response_format, tool arguments, guided_json): a string the schema gives no "
                    "maxLength gets at most this many characters, so a small model's answer closes instead of "
                    "running to max_tokens; a schema's own maxLength wins. 0: no cap.",
    )
    loop_stop_tokens: int = Field(
        64, ge=0,
        description="Free text ends (finish_reason stop) once its last this-many tokens or more repeat one block of "
                    "at most 128 words three times or more in a row (twice for a block of 120 characters or more, "
                    "two sentences said again word for word), compared as words (whitespace aside): a small "
                    "model that does not end its turn repeats itself until max_tokens; a block coming back with a word "
                    "changed here and there ends it after four copies. A constrained answer is never "
                    "cut: it is steered off a loop (the token continuing it ruled out for one step) or a run of 32 "
                    "digits (every digit ruled out for one step). Never with ignore_eos. 0: none of these.",
    )
    structured_max_decimals: int = Field(
        8, ge=0, le=15,
        description="Constrained output: a number the schema gives no multipleOf has at most this many digits after "
                    "the decimal point (a small model otherwise writes 1.1111... until max_tokens); the schema's own "
                    "multipleOf wins. 0: no cap.",
    )
    request_body_timeout_s: float = Field(
        30.0, gt=0, description="A request whose body sends no bytes for this long is refused (408)."
    )
    shutdown_timeout_s: float = Field(30.0, ge=0)
    cache_dir: str = Field(
        default_factory=default_cache_dir,
        description="Where the embedded base is converted to safetensors once.",
    )
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    # --- registry (experts added over HTTP) ---
    data_dir: str = Field(
        default_factory=lambda: str(Path.home() / ".local" / "share" / "loraplex"),
        description="Managed adapter store and manifest (LORAPLEX_DATA_DIR).",
    )
    adapter_roots: list[str] = Field(default_factory=list, description="Folders that POST /v1/adapters may read from.")
    admin_key: list[str] = Field(default_factory=list, description="Bearer keys for /v1/adapters; none = disabled.")
    api_key: list[str] = Field(default_factory=list, description="Bearer keys required for inference when set.")
    # --- tenants (server/tenants/) ---
    tenants: bool = Field(
        False, description="Multi-tenant mode: keys, limits and usage of tenants in <data_dir>/tenants.sqlite3 "
                           "(`loraplex tenants`, /v1/tenants). A tenant's key serves inference and manages that "
                           "tenant's own experts, files and jobs; every /v1 request then needs a key. Off: one "
                           "api_key / admin_key, exactly as without tenants.")
    tenant_queue_share: float = Field(
        0.5, gt=0, le=1, description="The largest share of max_queued_requests one tenant's waiting requests may "
                                     "take (more: 429), so a flood from one tenant leaves room in the queue for others.")
    fine_tuning: bool = Field(True, description="Serve /v1/fine_tuning/jobs and training files on /v1/files (admin "
                                                "key): train experts on the served base in a worker process and serve "
                                                "them when done.")
    max_file_bytes: int = Field(100_000_000, ge=1024, description="Largest file (training or batch input) accepted "
                                                                "by /v1/files.")
    # --- Responses and Batch APIs ---
    max_stored_responses: int = Field(
        10_000, ge=0,
        description="Responses kept for GET /v1/responses/{id} and previous_response_id (store: true, the default), "
                    "under data_dir/responses; past this many the oldest are removed. 0: nothing is stored.",
    )
    batches: bool = Field(True, description="Serve /v1/batches: JSONL files of chat, completions or responses "
                                            "requests run at low priority in the rows interactive requests leave free.")
    max_batch_lines: int = Field(50_000, ge=1, description="Requests one batch input file may hold (OpenAI's limit); "
                                                           "a longer file is refused.")
    batch_priority: int = Field(
        10, description="The scheduling priority batch lines run at (vLLM's: lower runs first; interactive requests "
                        "have 0 unless they say otherwise), added to a line's own `priority`. Interactive requests "
                        "preempt batch lines for rows and KV blocks.",
    )
    batch_concurrency: int | None = Field(
        None, ge=1,
        description="Batch lines in the engine at once, over all batches (default: max_batch_size): enough to fill "
                    "every free row, few enough that the queue never fills with batch work.",
    )
    fine_tune_threads: int = Field(1, ge=1, le=256, description="CPU threads a training run may use (serving keeps "
                                                                "the rest); runs also get a lower priority.")
    fine_tune_checkpoint_every: int = Field(10, ge=1, description="Steps between checkpoints: a cancelled or "
                                                                  "interrupted job resumes from the last one.")
    max_running_fine_tunes: int = Field(1, ge=1, le=16, description="Jobs trained at once; the rest wait queued.")
    # --- scale-out (Ray Serve; the loraplex[ray] extra) ---
    replicas: int = Field(
        0, ge=0, le=1024,
        description="Engine replicas on Ray Serve: 0 serves from this one process; N runs one ingress (the OpenAI "
                    "and admin API, the router, the registry) and N engine replicas (one GPU each on CUDA), "
                    "requests for an expert going to a replica that already holds it. data_dir must be storage "
                    "every replica reads.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to run on ('auto', 'ray://head:10001'); none: start a local one."
    )
    # --- experts fetched on first use (server/experts/sources.py) ---
    adapter_sources: list[AdapterSourceSpec] = Field(
        default_factory=list,
        description="Where experts that are not registered are looked for, in order, when a request names one "
                    "(kind: folder, s3 or huggingface; README, Adapter sources). A fetched expert passes the "
                    "upload's checks, is stored and listed, and stays until the cache evicts it.")
    adapter_cache_bytes: int = Field(
        10_000_000_000, ge=1024,
        description="Disk the experts fetched from adapter_sources may take in the store; past it the least "
                    "recently used one that no request is using is evicted (and fetched again when asked for). "
                    "Experts of the config and registered over HTTP are never evicted and not counted.")
    adapter_fetch_timeout_s: float = Field(60.0, gt=0, description="Longest one fetch from a source may take "
                                                                   "(connecting, and the whole download).")
    adapter_fetch_concurrency: int = Field(
        2, ge=1, le=64, description="Fetches running at once (others wait); requests for a name being fetched "
                                    "share its fetch.")
    adapter_refusal_ttl_s: float = Field(
        30.0, ge=0, description="A name whose fetch failed (not found, invalid, too large, source down) is answered "
                                "with that error, without asking the source, for this long.")
    max_gpu_adapters: int = Field(8, ge=1, description="Adapters resident on the compute device (LRU).")
    max_cpu_adapters: int = Field(32, ge=0, description="Evicted adapters kept in CPU memory (LRU).")
    max_adapter_rank: int = Field(64, ge=1)
    max_adapter_bytes: int = Field(256_000_000, ge=1024, description="Upload / adapter file size limit.")
    base_mismatch: Literal["refuse", "warn"] = Field(
        "refuse", description="An adapter whose base_model_name_or_path names another base."
    )
    ui: bool = Field(True, description="Serve the web playground at / (chat with experts, the router's decisions, "
                                       "the registry, live metrics); static files only, nothing leaves the page.")
    metrics_require_admin: bool = Field(False, description="Put GET /metrics behind the admin key.")
    vllm_metric_aliases: bool = Field(
        False, description="Also export vllm:lora_requests_info, vllm:num_requests_running/waiting and "
                           "vllm:kv_cache_usage_perc, for gateways configured for vLLM (README, Metrics).")
    # --- router ("model": "auto") ---
    router: Literal["embedded", "none"] = Field(
        "embedded", description="'embedded': the MiniLM + WordLlama encoders shipped in PyPI packages; 'none'."
    )
    router_margin: float = Field(
        -0.10, ge=-1.0, le=1.0,
        description="The chosen expert serves when its score minus the prompt's score against the generic background "
                    "is at least this; else the fallback does. Higher: more prompts fall back. Fixed on "
                    "loadtests/data/router_set.json (README, Routing).",
    )
    max_experts_per_request: int = Field(3, ge=1, le=16, description="Most experts one request may blend "
                                         "(X-Expert 'a:0.7,b:0.3', model 'a+b', router_top_k).")
    router_top_k: int = Field(1, ge=1, le=16, description="'auto' blends the top k experts that pass their margin, "
                                                          "weighted by a softmax of their scores (1: picks one).")
    router_mix_temperature: float = Field(0.05, gt=0, le=10, description="The softmax temperature of router_top_k "
                                          "mixing: lower gives the best expert more of the weight.")
    router_fallback: str | None = Field(None, description="Expert for low-confidence prompts; default the base.")
    auto_model_names: list[str] = Field(default_factory=lambda: ["auto"], description="model values that mean: route.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("adapters")
    @classmethod
    def _adapter_names_are_safe(cls, adapters: dict[str, AdapterSpec]) -> dict[str, AdapterSpec]:
        from adapters.names import check_adapter_name

        for name in adapters:
            check_adapter_name(name)
        return adapters

    @field_validator("adapter_sources")
    @classmethod
    def _source_names_are_unique(cls, sources: list) -> list:
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter_sources names must be unique: {names}")
        return sources

    @field_validator("adapter_roots", "admin_key", "api_key", "auto_model_names", mode="before")
    @classmethod
    def _split_lists(cls, value, info: ValidationInfo):
        """Environment variables give one string: comma-separated (roots: os.pathsep too)."""
        if isinstance(value, str):
            if info.field_name == "adapter_roots":
                value = value.replace(os.pathsep, ",")
            parts = value.split(",")
            return [part.strip() for part in parts if part.strip()]
        return value

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _memory_amount(cls, value):
        if isinstance(value, bool):
            raise ValueError("give bytes ('2GiB'), a fraction ('0.9') or 'auto'")
        text = str(value).strip()
        parse_memory(text)
        return text

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> "Settings":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> tuple[int | None, float | None]:
    """'auto' -> (None, None); '0.9' -> (None, 0.9); '2GiB' / '2000000000' -> (bytes, None)."""
    import re

    text = text.strip().lower()
    if text == "auto":
        return None, None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not an amount of memory: give bytes ('2GiB', '512MiB'), a fraction ('0.9') "
                         "or 'auto'")
    number, unit = float(match.group(1)), match.group(2)
    if not unit and number <= 1:
        if number <= 0:
            raise ValueError("a fraction of free memory must be above 0")
        return None, number
    amount = int(number * _UNITS[unit])
    if amount < 1:
        raise ValueError("the KV cache needs more than 0 bytes")
    return amount, None


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """LORAPLEX_MAX_BATCH_SIZE=8 -> {"max_batch_size": "8"}; JSON values allowed for dicts/lists."""
    overrides: dict[str, Any] = {}
    for field_name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + field_name.upper())
        if raw is None:
            continue
        if not raw.strip() and field_name in ("api_key", "admin_key"):
            # `LORAPLEX_API_KEY=$KEY` with KEY unset: no key, as if not set, but said out loud
            log.warning("%s%s is set but empty: no %s key is configured", ENV_PREFIX, field_name.upper(),
                        field_name.removesuffix("_key"))
        if raw.startswith(("{", "[")):  # (an empty value is not JSON: `""[:1] in "{["` would say it is)
            try:
                overrides[field_name] = json.loads(raw)
                continue
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"{ENV_PREFIX}{field_name.upper()} is not valid JSON: {exc}") from exc
        overrides[field_name] = raw
    return overrides


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    # Relative adapter paths are relative to the config file, so configs are portable.
    base_dir = Path(path).resolve().parent
    for spec in (data.get("adapters") or {}).values():
        if isinstance(spec, dict) and isinstance(spec.get("path"), str) and not os.path.isabs(spec["path"]):
            spec["path"] = str(base_dir / spec["path"])
    sources = data.get("adapter_sources")
    for spec in sources if isinstance(sources, list) else ():
        if isinstance(spec, dict) and spec.get("kind") == "folder" and isinstance(spec.get("path"), str) \
                and not os.path.isabs(spec["path"]):
            spec["path"] = str(base_dir / spec["path"])
    return data


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        lines.append(f"  {where}: {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    config_path: str | None = None,
    cli_overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(_read_yaml(config_path))
    merged.update(_env_overrides(dict(os.environ) if environ is None else environ))
    merged.update({k: v for k, v in (cli_overrides or {}).items() if v is not None})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from exc
