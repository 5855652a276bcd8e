"""End-to-end check of the real server on the GPU (issue 30): `loraplex serve` on a random-weight 7B-shaped NF4
base, 8 experts registered over HTTP, driven by the `openai` client as a user's program would.

    python -m loadtests.gpu_e2e OUT_DIR                              # CUDA: Llama-2-7B widths, --layers 4
    python -m loadtests.gpu_e2e OUT_DIR --shape tiny --device cpu    # seconds: checks the script itself

Steps, each written to OUT_DIR/e2e.jsonl the moment it ends (a failed step is recorded with its error; steps
that need a running server stop when it is gone):
  start     `python -m server.startup.cli serve` until /health answers ok; what its log says of the LoRA
            kernels, CUDA graphs, adapter slots and KV cache
  register  8 experts registered by POST /v1/adapters (folders under adapter_roots), each timed
  answers   a non-streamed chat completion on the base and one on an expert; a streamed one on an expert
            (its chunks joined equal a non-streamed answer to the same greedy request, asked alone: required
            on CPU, recorded on CUDA, where split-K's atomics make two identical requests differ slightly)
  mixed     32 requests at once over the 8 experts and the base, every other one streamed, ignore_eos: all
            answered in full; output tokens/s over the load
  retire    DELETE one expert: a request naming it gets 404, the others still answer; a ninth expert
            registered afterwards answers
  metrics   GET /metrics: requests counted per expert, the retired expert's series gone, the CUDA graph
            shapes captured and disabled
Files: progress.log, e2e.jsonl, e2e.md (rewritten after every step), server.log (the server's own log).
Exit code 0 when every step passed. A SIGTERM (gpu_run.sh's time limit) stops the server first.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import httpx
import torch

from loadtests.bench_gpu import SHAPES, llama_config, save_random_base, write_random_adapter
from tests.support.harness import ServerProcess
from loadtests.provenance import stamp

ADMIN = "e2e-admin-key"
EXPERTS = 8
# what the server's start-up log says about the GPU path (bootstrap.py, decode_graphs.py, lora_batch.py)
LOG_FACTS = re.compile(r"adapter slots:.*|KV cache:.*|CUDA graphs.*|LoRA kernels.*|graph memory.*")


class Steps:
    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.meta, self.results = out_dir, meta, []
        self.started = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.out_dir / "progress.log", "a") as handle:
            handle.write(line + "\n")

    def run(self, name: str, step, *args) -> dict:
        self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            record = {"step": name, **step(*args)}
        except Exception as exc:  # recorded; the caller decides whether the next step can run
            record = {"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000],
                      "traceback": traceback.format_exc()[-2000:]}
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.results.append(record)
        with open(self.out_dir / "e2e.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        (self.out_dir / "e2e.md").write_text(self.markdown())
        self.log(f"{name}: {'ok' if record.get('ok') else 'FAILED'} {record.get('error', '')}")
        return record

    def markdown(self) -> str:
        meta = self.meta
        lines = [f"GPU e2e: `{meta['command']}`, {meta['date'][:10]}, {meta['device']}, {meta['shape']} x "
                 f"{meta['layers']} layers NF4, {EXPERTS} rank-16 experts over HTTP", "",
                 "| step | ok | figures |", "| --- | --- | --- |"]
        for record in self.results:
            figures = {k: v for k, v in record.items() if k not in ("step", "ok", "traceback")}
            lines.append(f"| {record['step']} | {'yes' if record.get('ok') else '**no**'} | "
                         f"{json.dumps(figures, default=str)[:600]} |")
        return "\n".join(lines) + "\n"


def _client(server: ServerProcess, timeout: float):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what comes after {i} {i + 1} {i + 2}?"}]


def step_start(server: ServerProcess, timeout: float) -> dict:
    start = time.perf_counter()
    server.start(timeout=timeout)
    facts = LOG_FACTS.findall(server.log_path.read_text(errors="replace"))
    health = server.health()
    return {"ok": health["status"] == "ok", "ready_s": round(time.perf_counter() - start, 1), "log": facts}


def step_register(server: ServerProcess, folders: list[Path]) -> dict:
    times = {}
    for folder in folders:
        start = time.perf_counter()
        response = httpx.post(server.base_url + "/v1/adapters", json={"name": folder.name, "path": str(folder)},
                              headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        if response.status_code != 201:
            raise RuntimeError(f"registering {folder.name}: {response.status_code} {response.text[:300]}")
        times[folder.name] = round((time.perf_counter() - start) * 1000, 1)
    listed = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    return {"ok": {f.name for f in folders} <= {m["id"] for m in listed}, "register_ms": times}


def step_answers(server: ServerProcess, base: str, expert: str, timeout: float, exact: bool) -> dict:
    """`exact`: the streamed greedy answer must equal the plain one. Not on CUDA: split-K's atomic adds
    sum in another order each run, so two identical bf16 requests may part at a near-tie of a random
    model; there it is recorded, not required."""
    client = _client(server, timeout)
    greedy = dict(max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True})
    plain = {}
    for model in (base, expert):
        answer = client.chat.completions.create(model=model, messages=_messages(1), **greedy)
        plain[model] = answer
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model=expert, messages=_messages(1), stream=True,
                                            stream_options={"include_usage": True}, **greedy)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    record = {"base_text": plain[base].choices[0].message.content[:80],
              "expert_text": plain[expert].choices[0].message.content[:80], "streamed_text": streamed[:80],
              "stream_chunks": len(pieces), "stream_finish": finish,
              "stream_matches_plain": streamed == plain[expert].choices[0].message.content,
              "expert_differs_from_base": plain[base].choices[0].message.content
              != plain[expert].choices[0].message.content}
    record["ok"] = (all(a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 16
                        for a in plain.values())
                    and finish == "length" and usage is not None and usage.completion_tokens == 16
                    and (record["stream_matches_plain"] or not exact))
    return record


def step_mixed(server: ServerProcess, models: list[str], requests: int, tokens: int, timeout: float) -> dict:
    client = _client(server, timeout)
    results: dict[int, tuple] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        model = models[i % len(models)]
        try:
            if i % 2:
                count, finish = 0, None
                for chunk in client.chat.completions.create(
                        model=model, messages=_messages(i), max_tokens=tokens, temperature=0.7, seed=i, stream=True,
                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                outcome = (model, count, finish, None)
            else:
                answer = client.chat.completions.create(model=model, messages=_messages(i), max_tokens=tokens,
                                                        temperature=0.0, extra_body={"ignore_eos": True})
                outcome = (model, answer.usage.completion_tokens, answer.choices[0].finish_reason, None)
        except Exception as exc:  # noqa: BLE001 - recorded per request
            outcome = (model, 0, None, f"{type(exc).__name__}: {exc}"[:300])
        with lock:
            results[i] = outcome

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    wall = time.perf_counter() - start
    errors = [r[3] for r in results.values() if r[3]]
    tokens_out = sum(r[1] for r in results.values())
    return {"ok": len(results) == requests and not errors and all(r[1] == tokens and r[2] == "length"
                                                                  for r in results.values()),
            "requests": requests, "answered": len(results), "errors": errors[:3], "output_tokens": tokens_out,
            "wall_s": round(wall, 2), "output_tokens_per_s": round(tokens_out / wall, 1),
            "models": sorted(set(models))}


def step_retire(server: ServerProcess, retired: str, other: str, late: Path, timeout: float) -> dict:
    import openai

    client = _client(server, timeout)
    gone = httpx.delete(server.base_url + f"/v1/adapters/{retired}", headers={"Authorization": f"Bearer {ADMIN}"},
                        timeout=60)
    status, code = None, None
    try:
        client.chat.completions.create(model=retired, messages=_messages(0), max_tokens=4)
    except openai.NotFoundError as exc:
        status, code = exc.status_code, (exc.body or {}).get("code")
    still = client.chat.completions.create(model=other, messages=_messages(0), max_tokens=4)
    added = httpx.post(server.base_url + "/v1/adapters", json={"name": late.name, "path": str(late)},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    late_answer = client.chat.completions.create(model=late.name, messages=_messages(0), max_tokens=4)
    return {"ok": gone.status_code == 200 and status == 404 and still.choices[0].finish_reason is not None
            and added.status_code == 201 and late_answer.usage.completion_tokens >= 1,
            "delete_status": gone.status_code, "retired_request_status": status, "retired_request_code": code,
            "late_register_status": added.status_code}


def step_metrics(server: ServerProcess, experts: list[str], retired: str, cuda: bool) -> dict:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    counted = {name: f'loraplex_requests_total{{adapter="{name}"' in text for name in experts}
    graphs = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("loraplex_cuda_graph")}
    captured = graphs.get('loraplex_cuda_graph_shapes{state="captured"}', 0)
    disabled = graphs.get('loraplex_cuda_graph_shapes{state="disabled"}')
    # on CUDA: shapes captured at start, none disabled, decode steps replayed; on CPU: the series exist (zeros)
    graphs_ok = disabled == 0 and (captured > 0 and graphs.get("loraplex_cuda_graph_replays", 0) > 0 if cuda
                                   else captured == 0)
    return {"ok": all(v for k, v in counted.items() if k != retired) and not counted.get(retired, False)
            and "loraplex_kv_cache_usage_ratio" in text and graphs_ok,
            "experts_counted": sum(counted.values()), "retired_series_gone": not counted.get(retired, False),
            "cuda_graphs": graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=None, help="default: 4 for 7b, 2 for tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=32, help="requests at once in the mixed step")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per mixed request")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; for a check of the script use --shape tiny --device cpu")
    layers = args.layers or (4 if args.shape == "7b" else 2)
    timeout = 120 if cuda else 300  # per request: a CPU shared with other work is slow
    meta = {**stamp("loadtests.gpu_e2e", argv), "shape": args.shape, "layers": layers,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}
    steps = Steps(args.out_dir, meta)
    server = None

    def on_term(signum, frame):  # gpu_run.sh's time limit: the server must not outlive this script
        if server is not None and server.proc is not None:
            server.proc.kill()
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            config = llama_config(args.shape, layers, 512)
            save_random_base(config, work / "base", torch.device(args.device))
            roots = work / "experts"
            folders = [write_random_adapter(config, roots / f"expert{i}", 16, seed=i) for i in range(EXPERTS + 1)]
            folders, late = folders[:EXPERTS], folders[EXPERTS]
            steps.log(f"base ({args.shape} x {layers} layers) and {EXPERTS + 1} experts written")
            settings = {
                "base_model": str(work / "base"), "served_model_name": "base", "quantization": "nf4",
                "device": args.device, "compute_dtype": "auto", "max_batch_size": 64 if cuda else 8,
                "context_window": 512, "default_max_tokens": 64, "max_tokens_limit": 256, "max_gpu_adapters": EXPERTS,
                "max_cpu_adapters": EXPERTS, "max_adapter_rank": 16, "adapter_roots": [str(roots)],
                "router": "none", "fine_tuning": False, "ui": False, "shutdown_timeout_s": 5,
            }
            server = ServerProcess(work, settings, env={"LORAPLEX_ADMIN_KEY": ADMIN})
            if not steps.run("start", step_start, server, 300 if cuda else 240).get("ok"):
                return 1
            names = [folder.name for folder in folders]
            if steps.run("register", step_register, server, folders).get("ok"):
                steps.run("answers", step_answers, server, "base", names[0], timeout, not cuda)
                steps.run("mixed", step_mixed, server, ["base", *names], args.requests if cuda else 9,
                          args.tokens if cuda else 4, timeout)
                steps.run("retire", step_retire, server, names[-1], names[0], late, timeout)
            steps.run("metrics", step_metrics, server, names, names[-1], cuda)
        finally:
            if server is not None:
                code = server.stop()
                steps.log(f"server stopped: exit {code}")
                if server.log_path.exists():
                    shutil.copy(server.log_path, args.out_dir / "server.log")
    steps.log("done")
    return 0 if steps.results and all(record.get("ok") for record in steps.results) else 1


if __name__ == "__main__":
    sys.exit(main())
