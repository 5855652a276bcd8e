"""Issue #38's attack categories, rerun against the default server (configs/default.yaml, an admin key,
an adapter root):

    python -m loadtests.bench_reliability [--anonymous 10000] [--file-mb 50]

1. **5xx**: every input of the issue's list (malformed training files, numbers over 4,300 digits in admin
   JSON, a backtracking adapter pattern, expert.json outside the roots / a FIFO / too large, unknown routes,
   an empty stop for a job, a mixture registered while its member is deleted x 25): any 5xx counts.
2. **Stalls**: `/health` polled every 20 ms on one connection throughout; a gap over 1 s counts.
3. **Reads outside the roots**: an expert.json symlinked to a file outside them, holding a marker: a
   registration that succeeds or an answer that shows the marker counts.
4. **/metrics size**: bytes before and after `--anonymous` requests with distinct model strings (unknown
   names, and one mixture spelled with different spaces and weights).
5. **Streams while a file is checked**: 8 streamed requests decoding back to back, inter-token p50/p99 for
   `--window` seconds alone, then for the same time while a `--file-mb` training file is uploaded and checked.

Writes loadtests/results/bench_reliability.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from tests.support.harness import REPO, ServerProcess
from loadtests.provenance import stamp

BASE = "SmolLM2-135M-Instruct"
ADMIN = {"Authorization": "Bearer bench-admin"}
DEMO = REPO / "training" / "demo" / "pirate" / "adapter"
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def adapter_folder(folder: Path) -> Path:
    """A copy of a demo expert's two adapter files (no expert.json) at `folder`."""
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(DEMO / name, folder / name)
    return folder


class Tally:
    """Every answer of the attack run, by category; 5xx listed with what caused them."""

    def __init__(self):
        self.answers = 0
        self.server_errors: list[str] = []

    def check(self, what: str, response: httpx.Response) -> httpx.Response:
        self.answers += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{what}: {response.status_code} {response.text[:200]}")
        return response


class HealthWatch(threading.Thread):
    """/health on one connection every 20 ms; the gaps between answers."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.base_url, self.gaps, self.done = base_url, [], threading.Event()

    def run(self):
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self.done.is_set():
                start = time.monotonic()
                client.get("/health")
                self.gaps.append(time.monotonic() - start)
                time.sleep(0.02)


def _upload_training(client: httpx.Client, content: bytes) -> httpx.Response:
    return client.post("/v1/files", headers=ADMIN, data={"purpose": "fine-tune"},
                       files={"file": ("t.jsonl", content)}, timeout=600)


def attacks(server: ServerProcess, roots: Path, outside: Path, tally: Tally) -> dict:
    lora = adapter_folder(roots / "good")
    bad_lines = [
        '{"messages": [{"role": ["user"], "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
        '{"messages": [{"role": {"a": 1}, "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
        "[" * 100_000 + "]" * 100_000,
        '{"messages": [], "n": ' + "9" * 5000 + "}",
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
        '{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}',
        json.dumps(GOOD_CHAT) + "\x0c",
    ]
    huge = "1" + "0" * 5000
    reads_outside = 0
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for line in bad_lines:
            tally.check("training file", _upload_training(client, (json.dumps(GOOD_CHAT) + "\n" + line).encode()))
        good = tally.check("training file", _upload_training(client, json.dumps(GOOD_CHAT).encode())).json()
        tally.check("job with an empty stop", client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={
            "model": BASE, "training_file": good["id"], "stop": [""]}))
        tally.check("router_margin digits", client.post("/v1/adapters", headers={**ADMIN, "content-type":
                    "application/json"}, content='{"name": "d", "path": "%s", "router_margin": %s}' % (lora, huge)))
        files = {name: (name, (lora / name).read_bytes()) for name in ("adapter_config.json",
                                                                          "adapter_model.safetensors")}
        tally.check("examples digits", client.post("/v1/adapters", headers=ADMIN, data={
            "name": "d", "examples": f"[{huge}]"}, files={"adapter_config": files["adapter_config.json"],
                                                          "adapter_model": files["adapter_model.safetensors"]}))
        tally.check("r digits", client.post("/v1/adapters", headers=ADMIN, data={"name": "d"}, files={
            "adapter_config": ("adapter_config.json", ('{"peft_type": "LORA", "r": %s}' % huge).encode()),
            "adapter_model": files["adapter_model.safetensors"]}))
        pattern = json.loads((lora / "adapter_config.json").read_text())
        pattern["alpha_pattern"] = {r"(?:\w|\w\w|[\w.])*(?<=Q)": 4}
        tally.check("backtracking pattern", client.post("/v1/adapters", headers=ADMIN, data={"name": "regex"}, files={
            "adapter_config": ("adapter_config.json", json.dumps(pattern).encode()),
            "adapter_model": files["adapter_model.safetensors"]}))
        marker = "MARKER-OUTSIDE-THE-ROOTS"
        (outside / "secret.json").write_text(json.dumps({"description": marker}))
        for kind in ("symlink", "fifo", "large"):
            folder = adapter_folder(roots / kind)
            if kind == "symlink":
                (folder / "expert.json").symlink_to(outside / "secret.json")
            elif kind == "fifo":
                os.mkfifo(folder / "expert.json")
            else:
                (folder / "expert.json").write_text(json.dumps({"description": "x" * 5_000_000}))
            response = tally.check(f"expert.json {kind}", client.post("/v1/adapters", headers=ADMIN, json={
                "name": kind, "path": str(folder)}))
            if kind == "symlink" and (response.status_code == 201 or marker in response.text):
                reads_outside += 1
        for method, path in (("POST", "/v1/embeddings"), ("POST", "/v1/moderations"), ("GET", "/v1/nothing"),
                             ("PUT", "/v1/models")):
            tally.check(f"{method} {path}", client.request(method, path, json={}))
        tally.check("member", client.post("/v1/adapters", headers=ADMIN, json={"name": "member0", "path": str(lora)}))
        broken = 0
        for attempt in range(25):
            member, mixture = f"member{attempt}", f"blend{attempt}"
            if attempt:
                tally.check("member", client.post("/v1/adapters", headers=ADMIN, json={"name": member,
                                                                                        "path": str(lora)}))
            with ThreadPoolExecutor(2) as pool:
                registering = pool.submit(client.post, "/v1/adapters", headers=ADMIN, json={
                    "name": mixture, "mixture": {member: 0.5, "pirate": 0.5}})
                deleting = pool.submit(client.delete, f"/v1/adapters/{member}", headers=ADMIN)
                tally.check("race: mixture", registering.result())
                tally.check("race: delete", deleting.result())
            listed = {a["id"] for a in client.get("/v1/adapters", headers=ADMIN).json()["data"]}
            if mixture in listed and member not in listed:
                broken += 1
            for name in (mixture, member):
                if name in listed:
                    tally.check("cleanup", client.delete(f"/v1/adapters/{name}", headers=ADMIN))
    return {"reads_outside_roots": reads_outside, "race_tries": 25, "race_broken_mixtures": broken}


def anonymous_models(server: ServerProcess, count: int, tally: Tally) -> dict:
    before = len(httpx.get(server.base_url + "/metrics").content)

    def send(index: int) -> None:
        if index % 10 == 0:  # one mixture in ever-new spellings: served
            body = {"model": "pirate" + " " * (index // 10 % 50 + 1) + "+terse", "max_tokens": 1}
        else:
            body = {"model": f"anonymous-{index}", "max_tokens": 1}
        body["messages"] = [{"role": "user", "content": "Hi"}]
        tally.check("anonymous model", httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300))

    # the first tenth makes each kind's shared series (404, "mixture"); what the other nine tenths add is growth
    first = max(1, count // 10)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(first)))
        middle = len(httpx.get(server.base_url + "/metrics").content)
        list(pool.map(send, range(first, count)))
    after = len(httpx.get(server.base_url + "/metrics").content)
    return {"requests": count, "metrics_bytes_before": before, "metrics_bytes_after_first_tenth": middle,
            "metrics_bytes_after": after}


def _stream_gaps(base_url: str, stop: threading.Event, gaps: list[float]) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": 256, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300) as client:
        while not stop.is_set():
            last = None
            with client.stream("POST", base_url + "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.monotonic()
                    if last is not None and not stop.is_set():
                        gaps.append(now - last)
                    last = now


def _percentiles(gaps: list[float]) -> dict:
    gaps = sorted(gaps)
    return {"tokens": len(gaps), "p50_ms": round(statistics.median(gaps) * 1000, 1),
            "p99_ms": round(gaps[int(0.99 * (len(gaps) - 1))] * 1000, 1)}


def streams_while_checking(server: ServerProcess, file_mb: int, window: float, tally: Tally) -> dict:
    line = json.dumps({"messages": [{"role": "system", "content": "You answer briefly."},
                                    {"role": "user", "content": "What is the capital of France, and why?"},
                                    {"role": "assistant", "content": "Paris. It has been the seat of government "
                                                                     "for centuries."}]}) + "\n"
    content = (line * (file_mb * 1_000_000 // len(line))).encode()
    results = {}
    for phase in ("alone", "while_checking"):
        stop, gaps = threading.Event(), []
        streams = [threading.Thread(target=_stream_gaps, args=(server.base_url, stop, gaps)) for _ in range(8)]
        for stream in streams:
            stream.start()
        time.sleep(3)  # all 8 decoding
        gaps.clear()
        upload = None
        if phase == "while_checking":
            outcome = {}
            upload = threading.Thread(target=lambda: outcome.update(r=_upload_training(
                httpx.Client(base_url=server.base_url), content)))
            upload.start()
        time.sleep(window)
        results[phase] = _percentiles(list(gaps))
        stop.set()
        for stream in streams:
            stream.join()
        if upload is not None:
            started = time.monotonic()
            upload.join()
            response = tally.check("50 MB training file", outcome["r"])
            results["upload"] = {"bytes": len(content), "status": response.status_code,
                                 "finished_after_window_s": round(time.monotonic() - started, 1)}
    results["p99_ratio"] = round(results["while_checking"]["p99_ms"] / results["alone"]["p99_ms"], 2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anonymous", type=int, default=10_000, help="distinct anonymous model strings")
    parser.add_argument("--file-mb", type=int, default=50, help="training file checked while streams run")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of streaming measured per phase")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        roots, outside = workdir / "roots", workdir / "outside"
        roots.mkdir()
        outside.mkdir()
        settings = {**yaml.safe_load((REPO / "configs" / "default.yaml").read_text()), "adapter_roots": [str(roots)]}
        for spec in settings.get("adapters", {}).values():
            spec["path"] = str((REPO / "configs" / spec["path"]).resolve())
        server = ServerProcess(workdir, settings, env={"LORAPLEX_ADMIN_KEY": "bench-admin"}).start()
        tally, watch = Tally(), HealthWatch(server.base_url)
        watch.start()
        try:
            result = {**stamp("loadtests.bench_reliability", argv), "attacks": attacks(server, roots, outside, tally)}
            result["metrics"] = anonymous_models(server, args.anonymous, tally)
            result["streams"] = streams_while_checking(server, args.file_mb, args.window, tally)
        finally:
            watch.done.set()
            watch.join()
            code = server.stop()
        result["answers"] = tally.answers
        result["server_errors"] = tally.server_errors
        result["health"] = {"polls": len(watch.gaps), "max_gap_s": round(max(watch.gaps), 3),
                            "gaps_over_1s": sum(gap > 1 for gap in watch.gaps)}
        result["exit_code"] = code
    out = REPO / "loadtests" / "results" / "bench_reliability.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
