"""Scale-out on Ray Serve, for real: a local Ray cluster in this process, Serve's HTTP proxy, the ingress
and two engine replicas on the tiny Llama, driven over HTTP with the openai client and httpx.

What the replicas must do: keep an expert's requests on the replica that holds it (the response
names the replica), put a new expert on the replica with fewer, spill to the other under load, serve
an expert registered after they started with the same greedy tokens on both, refuse a retired one at
once, cancel on the replica when a client leaves, and fail only the requests of a replica that dies."""
import json
import os
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from tests.support.harness import free_port, wait_until
from tests.support import Q_PROJ_KEY, assert_openai_error, upload_files, write_lora
from tests.support.otlp import OtlpReceiver

ADMIN = {"Authorization": "Bearer k"}
HEADER = "x-loraplex-replica"
LEARN_S = 3  # for the ingress's Serve router to learn where a new expert was loaded (~0.1-0.2 s)
BATCH = 2  # max_batch_size: a replica takes this many requests at once, the rest wait at the ingress


@pytest.fixture(scope="module")
def cluster(tiny_folder, tmp_path_factory):
    from server.settings import Settings
    from server.startup import ray_serve

    root = tmp_path_factory.mktemp("ray")
    port = free_port()
    settings = Settings(base_model=str(tiny_folder), quantization="none", compute_dtype="float32",
                        data_dir=str(root / "data"), replicas=2, port=port, router="none", ui=False,
                        context_window=256, default_max_tokens=8, max_tokens_limit=200, max_batch_size=BATCH,
                        admin_key=["k"], adapter_roots=[str(root / "roots")], fine_tuning=False)
    torch.manual_seed(0)
    # each test registers experts of its own (tests pass in any order); strong enough to change the tiny
    # model's logprobs visibly
    for name in ("x", "y", "z", "w", "s", "p", "m"):
        write_lora(root / "roots" / name, width=128, tensors={Q_PROJ_KEY.format("A"): torch.randn(8, 128) * 0.3,
                                                              Q_PROJ_KEY.format("B"): torch.randn(128, 8) * 0.3})
    # the local cluster's processes (ingress, replicas) inherit the variables set while it starts: traces to
    # a receiver here, and Serve's wait for the replica holding a model (1-2 s by default) at 0.25-0.5 s, so
    # the spill tests need bursts of a second or so, not of several, to see a request placed on the other one.
    # Within that wait Serve asks the chosen replica for its queue length and gives up on it after 0.1 s (the
    # default), then after 0.2 s...; on a busy 2-core machine an idle replica can miss that, and a new expert
    # then lands on the busy one: 0.5 s lets the probe answer whenever the replica is alive.
    receiver = OtlpReceiver()
    environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                   "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "0.25",
                   "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",
                   "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2.0"}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        ray_serve.start(settings, local_cpus=6)
    finally:
        for name, old in saved.items():
            os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)
    try:
        yield f"http://127.0.0.1:{port}", root / "roots", receiver
    finally:
        ray_serve.shutdown()
        receiver.close()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster[0], timeout=60) as client:
        yield client


def chat(http, model, content="hi", **extra):
    response = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                       "temperature": 0, "max_tokens": 6, **extra})
    assert response.status_code == 200, response.text
    return response


def register(http, roots, name):
    loaded = http.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": name, "lora_path": str(roots / name)})
    assert loaded.status_code == 200, loaded.text


def experts_on(http) -> dict[str, set[str]]:
    return {replica: set(info["experts"]) for replica, info in http.get("/health").json().get("replicas", {}).items()}


def test_an_expert_stays_on_its_replica_and_a_new_one_goes_to_the_other(cluster, http):
    roots = cluster[1]
    base = http.get("/v1/models").json()["data"][0]["id"]
    assert chat(http, base).headers[HEADER]  # the base: load-balanced, not multiplexed
    register(http, roots, "x")
    first = chat(http, "x").headers[HEADER]
    # a replica reports the experts it holds every 0.1 s, through Serve's controller to the ingress's
    # router; a request sent before the router knows goes to the replica with the fewest experts
    time.sleep(LEARN_S)
    assert [chat(http, "x").headers[HEADER] for _ in range(4)] == [first] * 4
    # a miss goes to the replica holding the fewest experts (each replica's last report is exact: its set
    # only changes when it takes a request)
    held = experts_on(http)
    register(http, roots, "y")
    second = chat(http, "y").headers[HEADER]
    if len(held) == 1:  # the other replica has not taken an expert yet
        assert second != first
    elif len(held[first]) != len(held[second]):
        assert len(held[second]) < len(held[first])
    time.sleep(LEARN_S)
    assert {chat(http, "y").headers[HEADER] for _ in range(3)} == {second}
    assert len(experts_on(http)) == 2  # /health lists both replicas once they have taken requests
    assert http.get("/v1/adapters/x", headers=ADMIN).json()["tier"] == "device"  # held by a replica
    samples = http.get("/metrics").text
    hits = re.search(rf'^loraplex_replica_requests_total{{adapter="hit",replica="{first}"}} (\S+)$', samples, re.M)
    assert hits and float(hits.group(1)) >= 4
    assert re.search(r'^loraplex_time_to_first_token_seconds_count{adapter="x"} [1-9]', samples, re.M)  # at the ingress


def test_streams_errors_seeds_and_output_formats_pass_through_as_in_one_process(cluster, http):
    register(http, cluster[1], "p")
    client = openai.OpenAI(base_url=cluster[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Pick a colour."}]
    chunks = list(client.chat.completions.create(model="p", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="p", messages=messages, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=messages)
    # the seed travels with the request: the same draws on whichever replica
    seeded = [client.chat.completions.create(model="p", messages=messages, max_tokens=12, temperature=1.0, seed=7)
              .choices[0].message.content for _ in range(3)]
    assert len(set(seeded)) == 1
    # the output format travels as its grammar; the replica enforces it
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    answer = client.chat.completions.create(model="p", messages=messages, max_tokens=20, response_format={
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert json.loads(answer.choices[0].message.content)["colour"] in ("red", "blue")
    # several choices (each its own sequence, maybe on different replicas) and a mixture of two experts
    assert len(client.chat.completions.create(model="p", messages=messages, max_tokens=4, n=3).choices) == 3
    register(http, cluster[1], "m")
    mixed = http.post("/v1/chat/completions", json={"model": "p+m", "messages": messages, "max_tokens": 4})
    assert mixed.status_code == 200 and mixed.headers["x-expert"] == "m:1.00,p:1.00", mixed.text


def test_under_load_requests_spill_to_the_other_replica(cluster, http):
    register(http, cluster[1], "s")
    client = openai.OpenAI(base_url=cluster[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
    seen: list[str] = []

    def one():
        raw = client.chat.completions.with_raw_response.create(
            model="s", messages=[{"role": "user", "content": "go"}], max_tokens=180, extra_body={"ignore_eos": True})
        assert raw.parse().choices[0].finish_reason == "length"
        seen.append(raw.headers[HEADER])

    # each request runs for a second or more (the tiny model's 180 tokens), well past Serve's wait for the
    # holding replica (0.25-0.5 s here): the requests beyond its batch find it still full, and spill
    threads = [threading.Thread(target=one) for _ in range(3 * BATCH)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(seen) == 3 * BATCH and len(set(seen)) == 2, seen  # more than one replica batches


def test_a_new_expert_serves_the_same_greedy_tokens_on_both_replicas_and_retires_at_once(cluster, http):
    roots = cluster[1]
    created = http.post("/v1/adapters", headers=ADMIN, data={"name": "z"}, files=upload_files(roots / "z"))
    assert created.status_code == 201, created.text
    answers: dict[str, list[list[tuple]]] = {}
    lock = threading.Lock()

    def answer(model):
        # long enough that a burst keeps z's replica busy past Serve's 1-2 s wait for the replica holding a
        # model: only then does its router send z's requests to the other replica
        response = chat(http, model, "Name three colours.", max_tokens=80, ignore_eos=True, logprobs=True,
                        top_logprobs=3)
        return response, [(t["token"], t["logprob"], [top["token"] for top in t["top_logprobs"]])
                          for t in response.json()["choices"][0]["logprobs"]["content"]]

    def one():
        response, tokens = answer("z")
        with lock:
            answers.setdefault(response.headers[HEADER], []).append(tokens)

    for _ in range(3):  # bursts three times one replica's batch: both replicas serve z
        threads = [threading.Thread(target=one) for _ in range(3 * BATCH)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        if len(answers) == 2:
            break
    assert len(answers) == 2, answers.keys()
    every = [tokens for per_replica in answers.values() for tokens in per_replica]
    first = every[0]
    for tokens in every[1:]:  # the same greedy tokens and top-3 candidates; logprobs equal to float32 rounding
        assert [(t, top) for t, _, top in tokens] == [(t, top) for t, _, top in first]
        assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(tokens, first))
    _, base = answer(http.get("/v1/models").json()["data"][0]["id"])
    assert max(abs(a[1] - b[1]) for a, b in zip(base, first)) > 1e-2  # and they are z's, not the base's

    assert http.delete("/v1/adapters/z", headers=ADMIN).status_code == 200
    assert_openai_error(http.post("/v1/chat/completions", json={"model": "z", "messages": [{"role": "user", "content": "hi"}]}),
                        404, param="model")
    # the name comes back with other weights: a new key, never the old weights
    register(http, roots, "z")
    assert chat(http, "z").status_code == 200


def test_a_client_that_leaves_cancels_its_request_on_the_replica(cluster, http):
    register(http, cluster[1], "w")
    replica = chat(http, "w").headers[HEADER]
    time.sleep(LEARN_S)
    body = {"model": "w", "stream": True, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers[HEADER] == replica
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    # the next request on w is placed on the same replica, which reports the request it dropped
    assert wait_until(lambda: chat(http, "w").headers[HEADER] == replica
                      and http.get("/health").json()["replicas"][replica]["cancelled"] == 1, 20)
    # and its row is gone: a replica reports what ran there when it takes a request (before that request), so
    # each check sends one (a report taken while the dropped row was still being released stays until then)
    assert wait_until(lambda: chat(http, "w").headers[HEADER] == replica
                      and http.get("/health").json()["replicas"][replica]["running"] == 0, 10)


def test_a_replica_killed_mid_stream_fails_only_its_request(cluster, http):
    from server.startup import ray_serve

    base = http.get("/v1/models").json()["data"][0]["id"]
    body = {"model": base, "stream": True, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": "keep going"}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        victim = response.headers[HEADER]
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        ray_serve.kill_replica(victim)
        rest = [line for line in lines if line]
    assert time.monotonic() - started < 30  # an error frame, not a hang
    assert any('"code": "replica_unavailable"' in line for line in rest), rest[-3:]
    assert rest[-1] == "data: [DONE]"
    # the other replica (or the one Serve starts in its place) serves the next requests
    assert wait_until(lambda: http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}
                                        ).status_code == 200, 60)
    assert http.get("/health").json()["status"] == "ok"
    # Serve replaces the killed replica (and the ingress's router learns of it) before the next test: its actor
    # is named as soon as it is created, and RUNNING only once it has loaded the model (a test that needs two
    # replicas failed with every request on one while the new one was still loading)
    assert wait_until(lambda: len(ray_serve.replica_ids() - {victim}) == 2 and running_replicas() == 2, 120), \
        ray_serve.replica_ids()
    time.sleep(LEARN_S)


def running_replicas() -> int:
    from ray import serve

    from server.startup.ray_serve import APP_NAME

    deployment = serve.status().applications[APP_NAME].deployments["EngineReplica"]
    return deployment.replica_states.get("RUNNING", 0)


def test_the_ingress_restores_exactly_the_registered_experts_without_loading_the_model(tiny_folder, tmp_path):
    """What a restart of the whole app serves: the ingress rebuilds the registry from the shared store's
    manifest (the replicas learn experts from requests), reading the base's tokenizer and config only."""
    from server.settings import Settings
    from server.startup.bootstrap import create_ingress_state
    from server.startup.ray_serve import RemoteEngine
    from tests.support import in_process

    roots = tmp_path / "roots"
    for name in ("kept", "retired"):
        write_lora(roots / name, width=128)
    with in_process(tiny_folder, tmp_path / "data", router=False, admin_key=["k"],
                    adapter_roots=[str(roots)]) as (_, client):
        for name in ("kept", "retired"):
            assert client.post("/v1/load_lora_adapter", headers=ADMIN,
                               json={"lora_name": name, "lora_path": str(roots / name)}).status_code == 200
        assert client.delete("/v1/adapters/retired", headers=ADMIN).status_code == 200
    freed: list[str] = []
    settings = Settings(base_model=str(tiny_folder), quantization="none", data_dir=str(tmp_path / "data"),
                        router="none", fine_tuning=False, context_window=256)
    state = create_ingress_state(settings, lambda metrics, on_freed: RemoteEngine(None, metrics, freed.append, 8))
    assert [record.name for record in state.registry.all()] == ["kept"]
    record = state.registry.get("kept")
    assert state.base.context_window == 256 and state.engine.adapter_tier(record.key) == "disk"
    state.engine.retire_adapter(record.key)  # no request of this ingress uses it: its files go at once
    assert freed == [record.folder]


def test_a_requests_trace_crosses_to_the_engine_replica(cluster, http):
    """The caller's W3C trace context reaches the replica that generates: its "engine replica" span is in the
    caller's trace, under the ingress's request span, and counts the tokens it made."""
    receiver = cluster[2]
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    answer = http.post("/v1/chat/completions", headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                       json={"model": http.get("/v1/models").json()["data"][0]["id"], "max_tokens": 6,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text

    def names():
        return {s.name for s in receiver.in_trace(trace_id)}

    assert wait_until(lambda: {"engine replica", "POST /v1/chat/completions"} <= names(), 30), sorted(names())
    spans = receiver.in_trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    [request] = [s for s in spans if s.parent_span_id.hex() == parent]  # the ingress's span of the request
    [replica] = [s for s in spans if s.name == "engine replica"]
    chain, span = [], replica
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span.span_id)
    assert request.span_id in chain, [by_id[i].name for i in chain]
    attributes = {a.key: a.value for a in replica.attributes}
    assert attributes["loraplex.replica"].string_value == answer.headers[HEADER]
    assert attributes["gen_ai.usage.output_tokens"].int_value == answer.json()["usage"]["completion_tokens"]
