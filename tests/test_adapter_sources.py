"""Experts fetched on first use (issue 33), against real parts: the real server on the real SmolLM2, an
S3-compatible server in its own process reached over HTTP by boto3 (moto's server mode: tests/support/
sources.py says why not MinIO), a Hugging Face cache written by huggingface_hub and read with
HF_HUB_OFFLINE=1, a folder tree, a server that never answers and a port nothing listens on.

One server for the module (restarted once, on the same store, by the restart test); tests run in any order,
so each uses names of its own and measures metrics as differences."""
from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

from tests.support import Q_PROJ_KEY, assert_openai_error, scrape, write_lora
from tests.support.harness import ServerProcess, wait_until
from tests.support.sources import (DEMO, S3_SECRET, S3Server, SilentServer, closed_port_endpoint,
                                   lay_out_hub_cache)

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer sources-admin"}
PIRATE, TERSE, JSON_ANSWER = (DEMO / name / "adapter" for name in ("pirate", "terse", "json-answer"))
ADAPTER_BYTES = sum((PIRATE / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
CACHE_ROOM = 2  # demo-sized experts the cache holds
TIMEOUT_S = 8.0


class Live:
    """The module's server; restart() starts it again on the same store and settings."""

    def __init__(self, workdir, settings, env):
        self.workdir, self.settings, self.env = workdir, settings, env
        self.proc = ServerProcess(workdir, settings, env).start()

    @property
    def base_url(self) -> str:
        return self.proc.base_url

    def restart(self) -> None:
        self.proc.stop()
        self.proc = ServerProcess(self.workdir, self.settings, self.env).start()

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The S3 server with its bucket, the Hub cache and the folder tree, filled with adapters."""
    root = tmp_path_factory.mktemp("sources")
    s3 = S3Server(root / "moto.log")
    s3.bucket("adapters")
    for name, folder in (("pirate", PIRATE), ("crowd", TERSE), ("evict-a", PIRATE), ("evict-b", TERSE),
                         ("evict-c", JSON_ANSWER), ("held", PIRATE), ("filler-1", TERSE), ("filler-2", JSON_ANSWER),
                         ("kept", TERSE), ("mix-a", PIRATE), ("mix-b", TERSE)):
        s3.put_adapter("adapters", f"loras/acme/{name}", folder)
    bad = root / "bad"
    write_lora(bad / "nan", tensors={Q_PROJ_KEY.format("A"): torch.full((8, 576), float("nan")),
                                     Q_PROJ_KEY.format("B"): torch.zeros(576, 8)})
    write_lora(bad / "wrong-shape", width=640)
    config = (PIRATE / "adapter_config.json").read_bytes()
    s3.put_adapter("adapters", "loras/acme/nan", bad / "nan")
    s3.put_adapter("adapters", "loras/acme/wrong-shape", bad / "wrong-shape")
    s3.put_adapter("adapters", "loras/acme/corrupt", files={"adapter_config.json": config,
                                                           "adapter_model.safetensors": b"\x10\x00" * 5000})
    s3.put_adapter("adapters", "loras/acme/oversized", files={"adapter_config.json": config,
                                                             "adapter_model.safetensors": b"\0" * 7_000_000})
    s3.put_adapter("adapters", "loras/acme/pickle-bin", files={"adapter_config.json": config,
                                                              "adapter_model.bin": b"\x80\x04K\x01."})
    s3.put_adapter("adapters", "loras/acme/pickle-named-safetensors", files={
        "adapter_config.json": config, "adapter_model.safetensors": b"\x80\x04\x95" + b"\0" * 64})
    s3.put_adapter("adapters", "loras/acme/bad-config", files={"adapter_config.json": b"{not json",
                                                              "adapter_model.safetensors": b"x"})
    hub_cache = root / "hf-cache"
    lay_out_hub_cache(hub_cache, {"hubteam/terse": TERSE})
    shelf = root / "shelf"
    shutil.copytree(JSON_ANSWER, shelf / "shelf" / "json-answer")
    shutil.copytree(PIRATE, shelf / "acme" / "only-on-the-shelf")
    (root / "outside").mkdir()
    shutil.copytree(PIRATE, root / "outside" / "secret")
    silent = SilentServer()
    yield {"s3": s3, "hub_cache": hub_cache, "shelf": shelf, "silent": silent, "root": root}
    silent.close()
    s3.stop()


@pytest.fixture(scope="module")
def live(places, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sources-server")
    s3 = places["s3"]
    settings = {
        "max_batch_size": 8, "kv_cache_memory": "64MiB", "context_window": 1024, "router": "embedded", "admin_key": [ADMIN["Authorization"][7:]],
        "fine_tuning": False, "max_adapter_bytes": 6_000_000,
        "adapters": {"pirate": {"path": str(PIRATE)}},
        "adapter_cache_bytes": CACHE_ROOM * ADAPTER_BYTES + ADAPTER_BYTES // 2,
        "adapter_fetch_timeout_s": TIMEOUT_S, "adapter_refusal_ttl_s": 600,
        "adapter_sources": [
            S3Server.source("bucket", "adapters", ["acme/*"], prefix="loras"),
            {"name": "hub", "kind": "huggingface", "namespace": "hubteam", "cache_dir": str(places["hub_cache"]),
             "patterns": ["hubteam/*"]},
            {"name": "shelf", "kind": "folder", "path": str(places["shelf"]), "patterns": ["shelf/*", "acme/*"]},
            S3Server.source("stuck", "adapters", ["stuck/*"], env="STUCK"),
            S3Server.source("down", "adapters", ["down/*"], env="DOWN"),
        ],
    }
    env = {**s3.env(), **s3.env("STUCK"), "STUCK_ENDPOINT": places["silent"].endpoint,
           **s3.env("DOWN"), "DOWN_ENDPOINT": closed_port_endpoint(),
           "LORAPLEX_DATA_DIR": str(workdir / "data"), "HF_HUB_OFFLINE": "1"}
    server = Live(workdir, settings, env)
    yield server
    server.proc.stop()
    assert S3_SECRET not in server.log()  # credentials are never logged


def chat(live, model, max_tokens=2, headers=None, **extra):
    return httpx.post(live.base_url + "/v1/chat/completions", headers=headers, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Where is the treasure?"}],
        "max_tokens": max_tokens, "temperature": 0, **extra})


def fetches(live, source, outcome="fetched") -> float:
    return scrape(live).get(("loraplex_adapter_fetches_total", (("outcome", outcome), ("source", source))), 0.0)


def metric(live, name, **labels) -> float:
    return scrape(live).get((name, tuple(sorted(labels.items()))), 0.0)


def listed(live) -> dict[str, dict]:
    return {a["id"]: a for a in httpx.get(live.base_url + "/v1/adapters", headers=ADMIN, timeout=30).json()["data"]}


def store_state(live) -> tuple[list[str], dict]:
    """(the store's folders, the manifest's entries; none before the first registration writes it: the tests
    run in a random order)."""
    store, manifest = live.workdir / "data" / "store", live.workdir / "data" / "manifest.json"
    folders = sorted(p.name for p in store.iterdir()) if store.is_dir() else []
    return folders, json.loads(manifest.read_text())["adapters"] if manifest.is_file() else {}


# ---- first use --------------------------------------------------------------------------------------

def test_first_use_from_the_bucket_serves_the_adapter_as_registered(live):
    before = fetches(live, "bucket")
    response = chat(live, "acme/pirate", max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "acme/pirate"
    assert fetches(live, "bucket") == before + 1
    # the same files registered from the config answer the same, token for token
    assert response.json()["choices"][0]["message"]["content"] == \
        chat(live, "pirate", max_tokens=8).json()["choices"][0]["message"]["content"]
    shown = httpx.get(live.base_url + "/v1/adapters/acme/pirate", headers=ADMIN, timeout=30).json()
    assert shown["source"] == "bucket" and shown["origin"] == "s3://adapters/loras/acme/pirate/"
    assert shown["description"] and shown["examples"]  # its expert.json: routable
    assert "acme/pirate" in {m["id"] for m in httpx.get(live.base_url + "/v1/models", timeout=30).json()["data"]}
    # the official client, by the same name, now from the cache
    hits = metric(live, "loraplex_adapter_cache_hits_total")
    client = OpenAI(base_url=live.base_url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="acme/pirate", max_tokens=4,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == "acme/pirate" and fetches(live, "bucket") == before + 1
    assert metric(live, "loraplex_adapter_cache_hits_total") == hits + 1


def test_first_use_from_the_hub_cache_offline(live):
    before = fetches(live, "hub")
    response = chat(live, "hubteam/terse", headers={})
    assert response.status_code == 200, response.text
    assert fetches(live, "hub") == before + 1
    assert listed(live)["hubteam/terse"]["origin"] == "hf://hubteam/terse@main"
    # HF_HUB_OFFLINE: what the cache does not hold is not found, and nothing is downloaded
    error = assert_openai_error(chat(live, "hubteam/not-cached"), 404, "model")
    assert error["code"] == "model_not_found" and "'hub'" in error["message"]


def test_first_use_from_the_folder_tree_and_sources_in_order(live):
    response = chat(live, "shelf/json-answer")
    assert response.status_code == 200, response.text
    assert listed(live)["shelf/json-answer"]["source"] == "shelf"
    # acme/* is the bucket's first, then the shelf's: the bucket says not found, the shelf has it
    bucket_misses = fetches(live, "bucket", "not_found")
    response = chat(live, "acme/only-on-the-shelf", headers={"X-Expert": "acme/only-on-the-shelf"})
    assert response.status_code == 200, response.text
    assert fetches(live, "bucket", "not_found") == bucket_misses + 1
    assert listed(live)["acme/only-on-the-shelf"]["source"] == "shelf"


def test_concurrent_first_use_shares_one_fetch(live):
    before, fetched_bytes = fetches(live, "bucket"), metric(live, "loraplex_adapter_fetched_bytes_total",
                                                            source="bucket")
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: chat(live, "acme/crowd"), range(6)))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert fetches(live, "bucket") == before + 1
    fetched = metric(live, "loraplex_adapter_fetched_bytes_total", source="bucket") - fetched_bytes
    assert fetched == sum(f.stat().st_size for f in TERSE.iterdir()
                          if f.name in ("adapter_config.json", "adapter_model.safetensors", "expert.json"))


def test_a_mixture_of_experts_only_the_bucket_holds_fetches_each_member(live):
    before = fetches(live, "bucket")
    response = chat(live, "acme/mix-a+acme/mix-b")
    assert response.status_code == 200, response.text
    assert fetches(live, "bucket") == before + 2
    assert {"acme/mix-a", "acme/mix-b"} <= set(listed(live))
    # the header's weighted form, now from the cache
    weighted = chat(live, "anything", headers={"X-Expert": "acme/mix-a:0.7,acme/mix-b:0.3"})
    assert weighted.status_code == 200 and fetches(live, "bucket") == before + 2, weighted.text
    # a member no source has: the mixture's 404 names it
    error = assert_openai_error(chat(live, "acme/mix-a+acme/nowhere-else"), 404, "model")
    assert "acme/nowhere-else" in error["message"]


# ---- the cache ------------------------------------------------------------------------------------

def test_least_recently_used_is_evicted_and_fetched_again(live):
    evictions = metric(live, "loraplex_adapter_cache_evictions_total")
    for name in ("acme/evict-a", "acme/evict-b"):
        assert chat(live, name).status_code == 200
    assert chat(live, "acme/evict-a").status_code == 200  # a is now more recent than b
    before = fetches(live, "bucket")
    assert chat(live, "acme/evict-c").status_code == 200
    names = listed(live)
    assert "acme/evict-b" not in names and {"acme/evict-a", "acme/evict-c", "pirate"} <= set(names)
    assert metric(live, "loraplex_adapter_cache_evictions_total") > evictions
    assert metric(live, "loraplex_adapter_cache_bytes", state="used") <= CACHE_ROOM * ADAPTER_BYTES
    # its files leave the store once nothing uses them
    assert wait_until(lambda: len(store_state(live)[0]) == len(store_state(live)[1]), 10)
    assert chat(live, "acme/evict-b").status_code == 200  # fetched again
    assert fetches(live, "bucket") == before + 2
    assert "acme/evict-a" not in listed(live)  # now the least recently used


def test_an_expert_in_use_is_never_evicted(live):
    assert chat(live, "acme/held").status_code == 200
    # a stream far longer than the test: closed (so cancelled) once the cache has been filled around it
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", timeout=120, json={
            "model": "acme/held", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 900, "ignore_eos": True, "stream": True}) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data:"))
        assert '"error"' not in next(lines)  # it is decoding
        for name in ("acme/filler-1", "acme/filler-2"):  # more than the cache holds besides it
            assert chat(live, name, max_tokens=1).status_code == 200
            assert "acme/held" in listed(live)
        later = next(lines)
        assert '"error"' not in later and later != "data: [DONE]"  # still decoding on its expert


def test_config_experts_are_never_evicted_nor_counted(live):
    for name in ("acme/evict-a", "acme/evict-b", "acme/evict-c", "acme/kept"):
        assert chat(live, name).status_code == 200
    assert "pirate" in listed(live) and listed(live)["pirate"]["source"] == "config"


# ---- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, status, code, says", [
    ("acme/nan", 400, "invalid_adapter", "finite"),
    ("acme/wrong-shape", 400, "invalid_adapter", "576"),
    ("acme/corrupt", 400, "invalid_adapter", "safetensors"),
    ("acme/oversized", 400, "adapter_too_large", "over the limit"),
    ("acme/pickle-bin", 400, "invalid_adapter", "pickle"),
    ("acme/pickle-named-safetensors", 400, "invalid_adapter", "pickle"),
    ("acme/bad-config", 400, "invalid_adapter", "adapter_config.json"),
    ("acme/nowhere", 404, "model_not_found", "no adapter source has it"),
])
def test_a_bad_adapter_is_refused_leaves_nothing_and_is_remembered(live, name, status, code, says):
    before_store = store_state(live)
    error = assert_openai_error(chat(live, name), status, "model")
    assert error["code"] == code and says in error["message"], error
    assert name not in listed(live)
    assert store_state(live)[1] == before_store[1]  # the manifest is unchanged
    assert wait_until(lambda: not [f for f in store_state(live)[0] if f.startswith(".")], 5)  # no staging left
    attempts = sum(fetches(live, source, outcome) for source in ("bucket", "shelf")
                   for outcome in ("invalid", "too_large", "not_found"))
    again = assert_openai_error(chat(live, name), status, "model")
    assert again["code"] == code
    assert sum(fetches(live, source, outcome) for source in ("bucket", "shelf")
               for outcome in ("invalid", "too_large", "not_found")) == attempts  # not asked again


def test_a_source_that_hangs_times_out_while_others_are_served(live):
    outcome = {}

    def stuck():
        started = time.monotonic()
        outcome["response"] = chat(live, "stuck/anything")
        outcome["seconds"] = time.monotonic() - started

    waiting = threading.Thread(target=stuck)
    waiting.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert chat(live, "pirate", max_tokens=1).status_code == 200  # not held up by the fetch
    assert waiting.is_alive(), f"the fetch ended first ({time.monotonic() - started:.1f} s)"
    waiting.join()
    error = assert_openai_error(outcome["response"], 504, "model")
    assert error["code"] == "adapter_fetch_timeout" and "'stuck'" in error["message"]
    assert TIMEOUT_S - 0.5 <= outcome["seconds"] < TIMEOUT_S + 5
    assert fetches(live, "stuck", "timeout") == 1


def test_a_source_that_is_down_is_a_clear_error(live):
    error = assert_openai_error(chat(live, "down/anything"), 502, "model")
    assert error["code"] == "adapter_source_unreachable" and "'down'" in error["message"]
    assert "127.0.0.1" not in error["message"] and S3_SECRET not in error["message"]


@pytest.mark.parametrize("name, status", [
    ("acme/../outside/secret", 400), ("acme/./pirate", 400), ("acme//pirate", 400), ("acme/pirate/", 400),
    ("shelf/../../outside/secret", 400), ("/etc/passwd", 404), ("../outside/secret", 404),
    ("s3://adapters/loras/acme/pirate", 404), ("http://127.0.0.1:1/acme/pirate", 404),
])
def test_names_that_climb_or_are_absolute_never_reach_a_source(live, name, status):
    def attempts():
        samples = scrape(live)
        return sum(v for (n, _), v in samples.items() if n == "loraplex_adapter_fetches_total")

    before = attempts()
    for headers in (None, {"X-Expert": name}):
        error = assert_openai_error(chat(live, name if headers is None else "ignored-by-the-header",
                                         headers=headers), status)
        assert error["code"] == ("invalid_model_name" if status == 400 else "model_not_found")
    assert attempts() == before


# ---- restart --------------------------------------------------------------------------------------

def test_a_restart_keeps_the_cache(live):
    assert chat(live, "acme/kept").status_code == 200
    before = listed(live)
    cached = {name: a for name, a in before.items() if a["origin"]}
    used = metric(live, "loraplex_adapter_cache_bytes", state="used")
    live.restart()
    after = listed(live)
    assert {name for name, a in after.items() if a["origin"]} == set(cached)
    assert after["acme/kept"]["source"] == "bucket" and after["acme/kept"]["origin"] == cached["acme/kept"]["origin"]
    assert metric(live, "loraplex_adapter_cache_bytes", state="used") == used
    assert chat(live, "acme/kept").status_code == 200
    assert fetches(live, "bucket") == 0  # served from the store: this process fetched nothing
    assert metric(live, "loraplex_adapter_cache_hits_total") == 1
