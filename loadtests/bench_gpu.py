"""GPU benchmark (issue 8): engine throughput against batch size on a 7B-shaped NF4 Llama with 8 experts.

    python -m loadtests.bench_gpu OUT_DIR                     # one H100/H200-class GPU, < 5 minutes
    python -m loadtests.bench_gpu OUT_DIR --layers 32         # the full 7B depth (slower to build)
    python -m loadtests.bench_gpu OUT_DIR --shape tiny --device cpu   # seconds: checks the script itself

What it builds (random weights: speed does not depend on their values):
  - a Llama with Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads, vocab 32000), --layers deep,
    saved once as bf16 safetensors and loaded back NF4 through bitsandbytes, as `loraplex serve` loads a base;
  - eight rank-16 LoRA adapters on all seven linears of every layer, written in PEFT's file format;
  - loraplex's own Engine (continuous batching, the slot KV cache, the segmented-bmm LoRA, sampling,
    detokenizing), driven in-process: no HTTP, so the figures are the engine's.

What it measures, in this order, writing each result to OUT_DIR as soon as it has it:
  - adapter load time: adapter folder on disk -> validated -> resident in the GPU bank, per adapter;
  - for each batch size B, three loads, alternated: no adapter / one adapter for all B rows /
    eight adapters mixed row by row. Each submits B requests (--prompt tokens in, --tokens out, greedy,
    no early stop) at once and waits for all; it reports end-to-end output tokens/s (prefill, sampling
    and detokenizing included) and the median decode step time at full batch (forward + sync);
  - peak GPU memory (torch.cuda.max_memory_allocated) after loading and per load.
Files: progress.log (one line per phase), results.jsonl (one line per measurement), summary.json and
summary.md (rewritten after every measurement, so a run cut short still leaves its table).

It runs on the device image with the wheels loadtests/gpu_wheels.sh downloads (bitsandbytes is the one this script
needs; it imports no pydantic, fastapi or llguidance): tests/test_gpu_kit.py and tests/test_bench_gpu.py run it
under an interpreter narrowed to the image's packages plus those wheels (loadtests/image_env.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from adapters.lora import ATTENTION_MODULES, LINEAR_MODULES
from loadtests.provenance import stamp

SHAPES = {
    # Llama-2-7B's widths; depth comes from --layers
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128),
    # bitsandbytes on CPU wants widths divisible by its block size: multiples of 64
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64),
}
MODES = ("none", "one", "mixed8")


class Report:
    """Everything measured so far, flushed to disk after every addition."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = out_dir
        self.started = time.perf_counter()
        self.summary = {"meta": meta, "adapter_load_ms": [], "runs": [], "memory": {}, "skipped": []}
        out_dir.mkdir(parents=True, exist_ok=True)
        self.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        with open(self.out_dir / "progress.log", "a") as handle:
            handle.write(line + "\n")

    def add(self, kind: str, record: dict) -> None:
        with open(self.out_dir / "results.jsonl", "a") as handle:
            handle.write(json.dumps({"kind": kind, **record}) + "\n")
        self.flush()

    def flush(self) -> None:
        self.summary["ratios"] = ratios(self.summary["runs"])
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        (self.out_dir / "summary.md").write_text(markdown(self.summary))


def ratios(runs: list[dict]) -> list[dict]:
    """Per batch size: mixed8 / one and one / none, for step time and end-to-end throughput."""
    by_key = {(run["batch"], run["mode"]): run for run in runs}
    rows = []
    for batch in sorted({run["batch"] for run in runs}):
        row = {"batch": batch}
        for name, num, den in (("mixed8_vs_one", "mixed8", "one"), ("one_vs_none", "one", "none")):
            a, b = by_key.get((batch, num)), by_key.get((batch, den))
            if a and b:
                row[name + "_decode"] = round(a["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3)
                row[name + "_e2e"] = round(a["e2e_tokens_per_s"] / b["e2e_tokens_per_s"], 3)
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    meta = summary["meta"]
    lines = [f"# bench_gpu: {meta['device_name']}, {meta['shape']} x {meta['layers']} layers, NF4, "
             f"{meta['adapters']} rank-{meta['rank']} all-linear adapters, LoRA kernels: "
             f"{meta.get('lora_kernels', 'torch')}, CUDA graphs: {meta.get('cuda_graphs', 'off')} "
             f"({meta['date'][:10]})", ""]
    loads = summary["adapter_load_ms"]
    if loads:
        lines += [f"Adapter load, disk -> device bank: median {statistics.median(loads):.1f} ms "
                  f"(min {min(loads):.1f}, max {max(loads):.1f}, n={len(loads)})", ""]
    lines += [f"| batch | mode | decode step ms | decode tok/s | e2e tok/s | peak memory GiB ({meta['memory_measure']}) |",
              "|---:|---|---:|---:|---:|---:|"]
    for run in summary["runs"]:
        lines.append(f"| {run['batch']} | {run['mode']} | {run['step_ms_median']:.2f} | "
                     f"{run['decode_tokens_per_s']:.0f} | {run['e2e_tokens_per_s']:.0f} | {run['peak_gib']:.2f} |")
    lines += ["", "Ratios (goal: mixed8 / one >= 0.9 at batch 64):", "",
              "| batch | mixed8/one decode | mixed8/one e2e | one/none decode | one/none e2e |",
              "|---:|---:|---:|---:|---:|"]
    for row in summary["ratios"]:
        cells = [row.get(k, "") for k in ("mixed8_vs_one_decode", "mixed8_vs_one_e2e", "one_vs_none_decode",
                                          "one_vs_none_e2e")]
        lines.append(f"| {row['batch']} | " + " | ".join(str(c) for c in cells) + " |")
    if summary["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(summary["skipped"])]
    return "\n".join(lines) + "\n"


# ---- building the model and adapters ----------------------------------------------------


def llama_config(shape: str, layers: int, context: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max(context, 4096),
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                       rope_theta=10000.0)


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids, made here (no hub): three specials, the 256
    byte symbols, then merges of printable ASCII pairs and letter/digit triples. Every id decodes to text
    (the engine detokenizes what a random model emits), and it is byte-level as the tokenizers of real
    Llamas are: the server's structured-output matcher (llguidance) refuses a word-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()  # the printable stand-ins of the 256 bytes
    printable = [chr(c) for c in range(33, 127)]  # '!'..'~', their own stand-ins
    words = [c for c in printable if c.isalnum()]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(symbols):
        vocab[symbol] = len(vocab)
    merges = []
    pairs = ((a, b) for a in printable for b in printable)
    triples = ((a + b, c) for a in words for b in words for c in words)
    for left, right in (*pairs, *triples):
        if len(vocab) >= vocab_size:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_random_base(config, folder: Path, device: torch.device) -> None:
    """Random bf16 weights, initialised on the device (seconds for 7B widths), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # HF's init is N(0, 0.02); keep activations finite through the depth
        for param in model.parameters():
            param.normal_(0.0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    model.save_pretrained(folder)
    synthetic_tokenizer(config.vocab_size).save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_nf4(folder: Path, device: torch.device, dtype: torch.dtype):
    """Loaded as `loraplex serve` loads a base (models/base_model.py: NF4, no hub kernels)."""
    from transformers import AutoTokenizer

    from models.base_model import load_model

    model = load_model(folder, "nf4", dtype, device)
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def write_random_adapter(config, folder: Path, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA (adapter_config.json + adapter_model.safetensors) on all linears."""
    from safetensors.torch import save_file

    from adapters.lora import BaseShape

    shape = BaseShape.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in LINEAR_MODULES:
            in_features, out_features = shape.linear_features[module]
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator)
                                                  / in_features**0.5).to(torch.float16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator)
                                                  * 0.01).to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEAR_MODULES),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
    }))
    return folder


# ---- driving the engine -----------------------------------------------------------------


class StepTimer:
    """Wraps runner.step: wall time of each decode-only step (one token per row), synchronised, with
    its batch size. Steps that prefill a prompt chunk are not decode steps and are not recorded."""

    def __init__(self, runner):
        self.steps: list[tuple[int, float]] = []
        self.lora_kernels = runner.lora.kernels  # what "auto" chose
        self.graphs = runner.graphs  # None: every step eager
        self._step = runner.step
        self._sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
        runner.step = self

    def __call__(self, items):
        start = time.perf_counter()
        logits = self._step(items)
        self._sync()
        if all(len(item.token_ids) == 1 for item in items):
            self.steps.append((len(items), time.perf_counter() - start))
        return logits


def run_load(engine, timer: StepTimer, adapters: list[str | None], prompt_len: int, tokens: int, seed: int) -> dict:
    from server.engine.sampling import SamplingParams, make_generator
    from server.engine.sequence import Sequence

    generator = torch.Generator().manual_seed(seed)
    vocab = engine.call(lambda runner: runner.vocab_size).result(60)
    remaining = len(adapters)
    done = threading.Event()
    lock = threading.Lock()
    produced, errors = [], []

    def collect(output):  # runs on the engine thread: record, never raise
        nonlocal remaining
        if output.finish_reason:
            with lock:
                produced.append(output.completion_tokens)
                if output.error:
                    errors.append(output.error)
                remaining -= 1
                if remaining == 0:
                    done.set()

    timer.steps.clear()
    start = time.perf_counter()
    for i, adapter in enumerate(adapters):
        prompt = [1] + torch.randint(3, vocab, (prompt_len - 1,), generator=generator).tolist()
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        engine.submit(Sequence(f"bench-{i}", prompt, adapter, params, frozenset(),
                               make_generator(0, engine.device), collect, model=adapter or "base"))
    if not done.wait(600):
        raise RuntimeError("load did not finish in 600 s")
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    full = [seconds for batch, seconds in timer.steps if batch == len(adapters)]
    step = statistics.median(full) if full else float("nan")
    return {
        "wall_s": round(wall, 4),
        "output_tokens": sum(produced),
        "e2e_tokens_per_s": sum(produced) / wall,
        "step_ms_median": step * 1000,
        "decode_tokens_per_s": len(adapters) / step,
        "full_batch_steps": len(full),
    }


def mode_adapters(mode: str, batch: int, names: list[str]) -> list[str | None]:
    if mode == "none":
        return [None] * batch
    if mode == "one":
        return [names[0]] * batch
    return [names[i % len(names)] for i in range(batch)]  # row by row: no two neighbours share one


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=None, help="default: 8 for 7b, 2 for tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="compute dtype; auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batches", default="1,8,16,32,64")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-kernels", choices=("auto", "torch", "triton"), default="auto",
                        help="the server's lora_kernels setting (auto: Triton on CUDA when its self-check passes)")
    parser.add_argument("--cuda-graphs", choices=("auto", "off"), default="auto",
                        help="the server's cuda_graphs setting (auto: decode steps replayed from graphs on CUDA)")
    parser.add_argument("--budget-s", type=float, default=240, help="no new load starts after this many seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model is written (default: a temp dir)")
    args = parser.parse_args(argv)
    layers = args.layers or (8 if args.shape == "7b" else 2)
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; for a smoke run use --shape tiny --device cpu")

    meta = {
        **stamp("loadtests.bench_gpu", argv),  # date, machine, command, as every result file has them
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "shape": args.shape, "layers": layers, "dtype": str(dtype),
        "adapters": args.adapters, "rank": args.rank, "lora_kernels_asked": args.lora_kernels,
        "cuda_graphs_asked": args.cuda_graphs, "prompt_tokens": args.prompt, "output_tokens": args.tokens,
        "batches": batches,
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    report = Report(args.out_dir, meta)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        config = llama_config(args.shape, layers, args.prompt + args.tokens)
        report.log(f"writing a random {args.shape} x {layers}-layer base to {work}")
        save_random_base(config, work / "base", device)
        report.log("loading it NF4")
        reset_peak(device)
        model, tokenizer = load_nf4(work / "base", device, dtype)
        report.summary["memory"]["model_gib"] = round(peak_gib(device), 3)
        report.log(f"loaded; peak memory {report.summary['memory']['model_gib']:.2f} GiB")
        folders = [write_random_adapter(config, work / f"expert{i}", args.rank, seed=i) for i in range(args.adapters)]
        report.log(f"wrote {len(folders)} adapters")
        engine, timer = start_engine(model, tokenizer, max(batches), args.prompt + args.tokens, args.adapters,
                                     args.rank, args.lora_kernels, args.cuda_graphs)
        report.summary["meta"]["lora_kernels"] = timer.lora_kernels
        report.log(f"LoRA kernels: {timer.lora_kernels}")
        try:
            measure_adapter_loads(engine, folders, report)
            names = register_adapters(engine, folders)
            measure_throughput(engine, timer, names, batches, args, report, device)
        finally:
            engine.stop(30)
        graphs = timer.graphs
        report.summary["meta"]["cuda_graphs"] = "off" if graphs is None else (
            f"on ({len(graphs.shapes)} shapes captured at start in {graphs.warm_up_seconds:.1f} s, "
            f"{graphs.captured_bytes / 2**20:.0f} MiB; {graphs.replays} replays; {len(graphs.failed)} disabled"
            + (f": {next(iter(graphs.failed.values()))}" if graphs.failed else "") + ")")
    report.summary["memory"]["peak_gib"] = round(peak_gib(device), 3)
    report.log("done")
    report.flush()
    print(markdown(report.summary))
    return report.summary


def start_engine(model, tokenizer, max_batch: int, context: int, adapters: int, rank: int = 16,
                 lora_kernels: str = "auto", cuda_graphs: str = "auto"):
    from adapters.lora import BaseShape
    from server.engine.engine import Engine, EngineConfig
    from server.metrics import Metrics
    from server.engine.model_runner import ATTENTION_BLOCK, ModelRunner
    from server.engine.residency import AdapterCache

    window = -(-context // ATTENTION_BLOCK) * ATTENTION_BLOCK
    built = {}

    def load_runner():
        block_size = 16
        # one slot more than the experts: measure_adapter_loads adds a probe beside them
        runner = ModelRunner(model, tokenizer, max_batch * (window // block_size) + 1, block_size, window,
                             adapter_slots=adapters + 1, max_adapter_rank=rank, lora_kernels=lora_kernels,
                             cuda_graphs=cuda_graphs, max_batch_size=max_batch)
        cache = AdapterCache(runner.lora, BaseShape.from_config(model.config), max_device=adapters,
                             max_cpu=adapters, wake=lambda: engine.wake(), on_freed=lambda folder: None,
                             metrics=Metrics())
        built["timer"] = StepTimer(runner)
        return runner, cache

    # the whole prompt in one step: the timed steps are then pure decode steps of the full batch
    # and no step-cost cap on prompt chunks (the serving default keeps a chunk under 2x a decode step, which
    # with adapters admitted the batch over several steps: on the first GPU run no decode step at batch >= 16
    # held every row, and the table showed nan)
    config = EngineConfig(max_batch_size=max_batch, max_queued=4 * max_batch, max_step_tokens=max_batch * window,
                          max_step_slowdown=1.0)  # <= 1: chunks fill the step budget
    engine = Engine(load_runner, config, metrics=Metrics())
    engine.start()
    if not engine.ready.wait(600):
        raise RuntimeError(f"engine did not start: {engine.load_error}")
    if engine.load_error:
        raise engine.load_error
    return engine, built["timer"]


def measure_adapter_loads(engine, folders: list[Path], report: Report) -> None:
    """Disk -> validated LoraWeights -> the GPU bank, timed on the engine thread (it owns the bank)."""
    from adapters.lora import BaseShape, load_lora

    shape = BaseShape.from_config(engine.call(lambda runner: runner.config).result(60))

    def timed_load(folder: Path):
        def load(runner):
            start = time.perf_counter()
            weights = load_lora(folder, shape)  # read and checked on the host (a loader thread, when serving)
            read = time.perf_counter()
            runner.lora.add("load-probe", weights)  # into the slot (the engine thread, when serving)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            runner.lora.remove("load-probe")
            return (end - start) * 1000, {**runner.lora.last_load, "read_and_check_ms": round((read - start) * 1000, 2),
                                          "to_slot_ms": round((end - read) * 1000, 2)}
        return engine.call(load).result(120)

    timed_load(folders[0])  # first call pays one-off costs (CUDA context for copies, imports)
    for folder in folders:
        elapsed, copied = timed_load(folder)
        report.summary["adapter_load_ms"].append(round(elapsed, 2))
        report.summary.setdefault("adapter_to_slot_ms", []).append(copied["to_slot_ms"])
        report.add("adapter_load", {"folder": folder.name, "ms": round(elapsed, 2), **copied})
    report.log(f"adapter loads (ms): {report.summary['adapter_load_ms']}; into the slot (ms): "
               f"{report.summary.setdefault('adapter_to_slot_ms', [])}")


def register_adapters(engine, folders: list[Path]) -> list[str]:
    names = [folder.name for folder in folders]
    for name, folder in zip(names, folders):
        engine.register_adapter(name, str(folder)).result(60)
    return names


def measure_throughput(engine, timer, names, batches, args, report: Report, device) -> None:
    # warm-up: every adapter resident on the device, every kernel shape compiled once
    for mode in MODES:
        run_load(engine, timer, mode_adapters(mode, len(names), names), args.prompt, 4, seed=99)
    report.log("warm-up done")
    for batch in batches:
        for mode in MODES:  # alternated within a batch size so drift hits all three alike
            label = f"{mode}@{batch}"
            if report.elapsed() > args.budget_s:
                report.summary["skipped"].append(label)
                report.flush()
                continue
            reset_peak(device)
            result = run_load(engine, timer, mode_adapters(mode, batch, names), args.prompt, args.tokens,
                              seed=batch)
            record = {"batch": batch, "mode": mode, **result, "peak_gib": round(peak_gib(device), 3)}
            report.summary["runs"].append(record)
            report.add("throughput", record)
            report.log(f"{label}: step {record['step_ms_median']:.2f} ms, decode {record['decode_tokens_per_s']:.0f} "
                       f"tok/s, e2e {record['e2e_tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
