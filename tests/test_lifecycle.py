"""Start-up, overload and shutdown of the real server process."""
import gc
import json
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import httpx
import pytest

from tests.support.harness import REPO, ServerProcess, wait_until
from tests.support import BASE
from training.demo.skills import SKILLS, generate, grade

pytestmark = pytest.mark.integration

LONG = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60,
        "ignore_eos": True}


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "server.startup.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_bad_config_exits_with_a_clear_message(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_batch_size: 0\nquantization: nf5\nno_such_key: 1\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    for word in ("max_batch_size", "quantization", "no_such_key"):
        assert word in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_non_zero(tmp_path):
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def _log_of_refused_config_expert(tmp_path, cache_dir, name: str, folder) -> str:
    """Start a server whose config names one expert; it must exit 1. Returns its log."""
    server = ServerProcess(tmp_path, {"adapters": {name: {"path": str(folder)}}}, env={"LORAPLEX_CACHE": cache_dir})
    server.launch()
    assert server.proc.wait(180) == 1
    return server.log()


def test_broken_adapter_stops_the_server_with_its_name(tmp_path, cache_dir):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    log = _log_of_refused_config_expert(tmp_path, cache_dir, "broken", tmp_path / "broken")
    assert "broken" in log and "safetensors" in log


def test_config_expert_named_like_the_router_stops_the_server(tmp_path, cache_dir):
    (tmp_path / "any").mkdir()
    log = _log_of_refused_config_expert(tmp_path, cache_dir, "auto", tmp_path / "any")
    assert "adapter 'auto'" in log and "reserved" in log


def test_health_is_503_while_loading_then_200(tmp_path, cache_dir):
    server = ServerProcess(tmp_path, {}, env={"LORAPLEX_CACHE": cache_dir}).launch()
    try:
        statuses = []

        def poll():
            try:
                statuses.append(httpx.get(server.base_url + "/health", timeout=2).status_code)
            except httpx.HTTPError:
                return False
            return statuses[-1] == 200

        assert wait_until(poll, 180, interval=0.05), server.log()
        assert statuses[0] == 503 and statuses[-1] == 200
    finally:
        assert server.stop() == 0


@pytest.fixture
def small_server(tmp_path, cache_dir):
    settings = {"max_batch_size": 1, "max_queued_requests": 1, "compute_dtype": "float32",
                "shutdown_timeout_s": 60}
    server = ServerProcess(tmp_path, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    yield server
    server.stop()


def stream_in_background(server, body, results):
    def run():
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            results.append([line for line in response.iter_lines() if line])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def hold_stream(server, body):
    """A stream read in the background until `release` is set, then closed (the client goes away)."""
    release, frames = threading.Event(), []

    def run():
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            for line in response.iter_lines():
                frames.append(line)
                if release.is_set():
                    return

    thread = threading.Thread(target=run)
    thread.start()
    return thread, release, frames


def test_queue_full_is_429_with_retry_after(small_server):
    # budgets far longer than the test: the requests stay running / queued until the test lets them go
    held = {**LONG, "max_tokens": 1500}
    running, release_running, _ = hold_stream(small_server, held)
    assert wait_until(lambda: small_server.health()["running"] == 1, 30)
    queued, release_queued, queued_frames = hold_stream(small_server, held)
    assert wait_until(lambda: small_server.health()["waiting"] == 1, 30)
    response = httpx.post(small_server.base_url + "/v1/chat/completions", json=LONG, timeout=30)
    assert response.status_code == 429 and response.headers["retry-after"]
    assert response.json()["error"]["type"] == "rate_limit_error"
    release_running.set()  # the running one goes: the queued one is admitted in its place
    running.join(60)
    assert wait_until(lambda: small_server.health()["waiting"] == 0 and any("content" in f for f in queued_frames), 30)
    release_queued.set()
    queued.join(60)
    assert wait_until(lambda: small_server.health()["running"] == 0, 30)


def test_sigterm_drains_running_requests_then_exits_0(small_server):
    results = []
    running = stream_in_background(small_server, {**LONG, "max_tokens": 300}, results)  # runs through the checks
    assert wait_until(lambda: small_server.health()["running"] == 1, 30)
    small_server.signal()
    assert wait_until(lambda: small_server.health()["status"] == "draining", 10)
    refused = httpx.post(small_server.base_url + "/v1/chat/completions", json=LONG, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    running.join(120)
    assert small_server.proc.wait(60) == 0
    frames = results[0]
    assert frames[-1] == "data: [DONE]" and '"finish_reason": "length"' in frames[-2]


def test_auto_without_experts_is_served_by_the_base_and_says_so(small_server):
    assert wait_until(lambda: small_server.health()["router"] == "ready", 120)
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    response = httpx.post(small_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["x-expert"] == BASE and response.headers["x-router-source"] == "fallback"
    assert response.headers["x-router-reason"] == "no experts to route to"


def test_serve_with_no_config_serves_the_default_config_and_its_demo_experts(tmp_path, cache_dir):
    server = ServerProcess(tmp_path, None, env={"LORAPLEX_CACHE": cache_dir}).start()  # `loraplex serve`, no --config
    try:
        models = {m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
        assert {"json-answer", "pirate", "terse", *SKILLS} <= models
        body = {"model": "json-answer", "messages": [{"role": "user", "content": "What is the capital of Norway?"}],
                "temperature": 0, "max_tokens": 40}
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        assert reply["finish_reason"] == "stop" and reply["message"]["content"].startswith('{"answer"')
        # a skill expert answers a held-out prompt right, graded by its program (accuracy: loadtests/bench_moe.py)
        item = generate("sql", "heldout", 1, seed=1)[0]
        body = {"model": "sql", "messages": [{"role": "user", "content": item.prompt}], "temperature": 0,
                "max_tokens": 64}
        reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        assert reply["finish_reason"] == "stop" and grade("sql", reply["message"]["content"], item.gold), reply
        assert wait_until(lambda: server.health()["router"] == "ready", 120)
        route = httpx.post(server.base_url + "/v1/route", timeout=30, json={"messages": [{"role": "user", "content":
            "Summarize in one sentence: The town of Elmstead opened a new library on Monday. It has three floors."}]})
        assert route.json()["decision"]["expert"] == "terse"
        # started with the garbage collector off, turned back on once loaded (server/startup/serve.py)
        frozen = lambda: re.search(r"loaded: (\d+) objects frozen out of garbage collection", server.log())  # noqa: E731
        assert wait_until(frozen, 30) and int(frozen().group(1)) > 100_000
    finally:
        assert server.stop() == 0


def test_the_collector_comes_back_on_once_the_engine_and_the_router_are_loaded():
    """What `loraplex serve` runs once loaded, on this process's real collector: it waits for the engine and
    the router's thread, then collects, freezes what is left and turns the collector back on; a server
    stopping before that leaves it to the exit, which puts the collector back as Python runs it."""
    from server.startup.serve import _collect_once_loaded, _collector_as_before

    router_may_end = threading.Event()
    router = threading.Thread(target=router_may_end.wait)
    engine = SimpleNamespace(ready=threading.Event(), load_error=None)
    state, stopping = SimpleNamespace(engine=engine, router_thread=router), threading.Event()
    gc.disable()
    try:
        router.start()
        waiting = threading.Thread(target=_collect_once_loaded, args=(state, stopping))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not gc.isenabled()  # the engine is still loading
        engine.ready.set()
        waiting.join(0.5)
        assert waiting.is_alive() and not gc.isenabled()  # the router's index is still being built
        router_may_end.set()
        waiting.join(30)
        assert not waiting.is_alive() and gc.isenabled() and gc.get_freeze_count() > 0
        _collector_as_before(waiting, stopping)
        assert gc.isenabled() and gc.get_freeze_count() == 0
        # stopped while loading: nothing is done until the exit, which turns it back on
        gc.disable()
        state = SimpleNamespace(engine=SimpleNamespace(ready=threading.Event(), load_error=None), router_thread=None)
        stopping = threading.Event()
        waiting = threading.Thread(target=_collect_once_loaded, args=(state, stopping))
        waiting.start()
        _collector_as_before(waiting, stopping)
        assert not waiting.is_alive() and gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        router_may_end.set()
        gc.unfreeze()
        gc.enable()


def test_a_stream_cut_by_the_shutdown_timeout_ends_with_a_finish_reason(tmp_path, cache_dir):
    settings = {"max_batch_size": 2, "compute_dtype": "float32", "shutdown_timeout_s": 0.5}
    server = ServerProcess(tmp_path, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    try:
        results = []
        running = stream_in_background(server, {**LONG, "max_tokens": 400}, results)
        assert wait_until(lambda: server.health()["running"] == 1, 30)
        server.signal()
        running.join(120)
        assert server.proc.wait(60) == 0
        frames = results[0]
        assert frames[-1] == "data: [DONE]"
        cut = json.loads(frames[-3].removeprefix("data: "))
        assert cut["choices"][0]["finish_reason"] == "abort"  # the server ended it: said, not left open
        assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    finally:
        server.stop()
