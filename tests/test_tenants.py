"""Tenants on the real server and the real model (SmolLM2, NF4), through the openai client and plain HTTP:
tenant A's experts, mixture, file and job are invisible to tenant B (every endpoint answers exactly what it
answers for a name that does not exist), the config's expert is shared; keys rotate and revoke (also from
the command line while the server runs); limits answer 429 with OpenAI's headers; usage is counted per
tenant, model and day; a restart keeps all of it; a request's spans reach a real OTLP/HTTP receiver in the
caller's trace. One server for the module (restarted by one test)."""
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from tests.conftest import ROUTING
from tests.support import assert_openai_error, scrape, upload_files, value
from tests.support.harness import REPO, ServerProcess, wait_until
from tests.support.otlp import OtlpReceiver

pytestmark = pytest.mark.integration
ADMIN_KEY = "tenants-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LINES = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                           {"role": "assistant", "content": "An answer."}]}) for i in range(8))


class World:
    """The server (replaced by a restart), its tenants' keys and the objects tenant A made."""

    def __init__(self, workdir, settings, env):
        self.workdir, self.settings, self.env = workdir, settings, env
        self.server = ServerProcess(workdir, settings, env).start()
        self.keys: dict[str, str] = {}
        self.tenants: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return self.server.base_url

    def restart(self) -> None:
        assert self.server.stop() == 0, self.server.log()
        self.server = ServerProcess(self.workdir, self.settings, self.env).start()

    def auth(self, who: str) -> dict:
        return ADMIN if who == "admin" else {"Authorization": f"Bearer {self.keys[who]}"}

    def call(self, method: str, path: str, who: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={**self.auth(who), **kwargs.pop("headers", {})},
                             timeout=120, **kwargs)

    def add_tenant(self, name: str, limits: dict | None = None) -> str:
        made = self.call("POST", "/v1/tenants", "admin", json={"name": name, "limits": limits})
        assert made.status_code == 201, made.text
        self.tenants[name] = made.json()
        key = self.call("POST", f"/v1/tenants/{made.json()['id']}/keys", "admin", json={"name": "tests"})
        assert key.status_code == 201 and key.json()["key"].startswith("lpx-")
        self.keys[name] = key.json()["key"]
        return self.keys[name]

    def chat(self, who: str, model: str, **extra) -> httpx.Response:
        body = {"model": model, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi."}], **extra}
        return self.call("POST", "/v1/chat/completions", who, json=body, headers=extra.pop("headers", {}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm_adapters, cache_dir):
    workdir = tmp_path_factory.mktemp("tenants")
    shutil.copytree(smollm_adapters["alpha"], workdir / "shelf" / "shelf" / "cook")  # model 'shelf/cook'
    settings = {"quantization": "nf4", "compute_dtype": "float32", "max_batch_size": 4, "context_window": 512,
                "default_max_tokens": 8, "tenants": True, "admin_key": [ADMIN_KEY],
                "adapters": {"shared-alpha": {"path": str(smollm_adapters["alpha"]), **ROUTING["alpha"]}},
                "adapter_sources": [{"name": "shelf", "kind": "folder", "path": str(workdir / "shelf"),
                                     "patterns": ["shelf/*"]}]}
    receiver = OtlpReceiver()
    env = {"LORAPLEX_CACHE": cache_dir, "LORAPLEX_DATA_DIR": str(workdir / "data"),
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    world = World(workdir, settings, env)
    world.receiver = receiver
    try:
        world.add_tenant("a")
        world.add_tenant("b")
        made = world.call("POST", "/v1/adapters", "a", files=upload_files(smollm_adapters["beta"]),
                          data={"name": "a-cook", "description": ROUTING["beta"]["description"],
                                "examples": json.dumps(ROUTING["beta"]["examples"])})
        assert made.status_code == 201, made.text
        mixed = world.call("POST", "/v1/adapters", "a", json={"name": "a-mix", "mixture": {"a-cook": 0.5,
                                                                                          "shared-alpha": 0.5}})
        assert mixed.status_code == 201, mixed.text
        client = openai.OpenAI(base_url=world.url + "/v1", api_key=world.keys["a"], max_retries=0, timeout=60)
        world.file = client.files.create(file=("a.jsonl", io.BytesIO(LINES.encode())), purpose="fine-tune").id
        base = client.models.list().data[0].id
        world.job = client.fine_tuning.jobs.create(model=base, training_file=world.file, suffix="a").id
        client.fine_tuning.jobs.cancel(world.job)  # only its record is needed, not a training run
        assert wait_until(lambda: world.server.health().get("router") == "ready", 120), world.server.health()
        yield world
    finally:
        world.server.stop()
        receiver.httpd.shutdown()


def same_absence(real: httpx.Response, ghost: httpx.Response, name: str, ghost_name: str) -> None:
    """The answer for another tenant's object is the answer for one that does not exist (names swapped)."""
    assert real.status_code == ghost.status_code, (real.text, ghost.text)
    assert real.text.replace(name, "<name>") == ghost.text.replace(ghost_name, "<name>"), (real.text, ghost.text)


def test_another_tenants_objects_answer_as_if_absent_on_every_endpoint(world):
    # corrections need the router: ready again if a restart (test order is random) came first
    assert wait_until(lambda: world.server.health().get("router") == "ready", 120), world.server.health()
    file, job = world.file, world.job
    ghost_file, ghost_job = "file-0123456789abcdef012345", "ftjob-0123456789abcdef012345"
    chat_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for name, ghost in [("a-cook", "no-such-expert"), ("a-mix", "no-such-mixture")]:
        probes = [
            ("GET", f"/v1/models/{name}", {}),
            ("GET", f"/v1/adapters/{name}", {}),
            ("DELETE", f"/v1/adapters/{name}", {}),
            ("POST", "/v1/chat/completions", {"json": {"model": name, **chat_body}}),
            ("POST", "/v1/completions", {"json": {"model": name, "prompt": "hi", "max_tokens": 2}}),
            ("POST", "/v1/chat/completions", {"json": {"model": f"{name}+shared-alpha", **chat_body}}),
            ("POST", "/v1/chat/completions", {"json": {"model": "auto", **chat_body},
                                              "headers": {"X-Expert": f"{name}:0.5,shared-alpha:0.5"}}),
            ("POST", "/v1/route", {"json": {"model": name, "messages": chat_body["messages"]}}),
            ("POST", "/v1/router/corrections", {"json": {"corrections": [{"prompt": "x", "expert": name}]}}),
            ("POST", "/v1/adapters", {"json": {"name": "b-mix", "mixture": {name: 1.0}}}),
            ("POST", "/tokenize", {"json": {"model": name, "prompt": "hi"}}),
        ]
        for method, path, kwargs in probes:
            real = world.call(method, path, "b", **kwargs)
            swapped = json.loads(json.dumps(kwargs).replace(name, ghost))
            absent = world.call(method, path.replace(name, ghost), "b", **swapped)
            assert real.status_code in (400, 404), (method, path, real.text)
            same_absence(real, absent, name, ghost)
    for method, path in [("GET", f"/v1/files/{file}"), ("GET", f"/v1/files/{file}/content"),
                         ("DELETE", f"/v1/files/{file}"), ("GET", f"/v1/fine_tuning/jobs/{job}"),
                         ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"), ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
                         ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints")]:
        real = world.call(method, path, "b")
        absent = world.call(method, path.replace(file, ghost_file).replace(job, ghost_job), "b")
        assert real.status_code == 404, (path, real.text)
        same_absence(real, absent, file if "files" in path else job, ghost_file if "files" in path else ghost_job)
    made = world.call("POST", "/v1/fine_tuning/jobs", "b", json={"model": world.call("GET", "/v1/models", "b").json()
                                                                ["data"][0]["id"], "training_file": file})
    assert made.status_code == 400 and file in made.json()["error"]["message"]
    # listings: B sees the shared expert and nothing of A's; A sees its own and the shared one
    listed = {who: [m["id"] for m in world.call("GET", "/v1/models", who).json()["data"]] for who in ("a", "b")}
    assert "shared-alpha" in listed["b"] and not {"a-cook", "a-mix"} & set(listed["b"])
    assert {"a-cook", "a-mix", "shared-alpha"} <= set(listed["a"])
    assert [r["id"] for r in world.call("GET", "/v1/adapters", "b").json()["data"]] == ["shared-alpha"]
    # (other tests, in a random order, may have uploaded batch files of A's and B's own)
    b_files = {f["id"] for f in world.call("GET", "/v1/files", "b").json()["data"]}
    a_files = {f["id"] for f in world.call("GET", "/v1/files", "a").json()["data"]}
    assert file in a_files and not a_files & b_files
    assert world.call("GET", "/v1/fine_tuning/jobs", "b").json()["data"] == []
    assert "_owner" not in world.call("GET", f"/v1/files/{file}", "a").json()
    # an admin sees every tenant's experts, another tenant's by ref: name@tenant
    a_id = world.tenants["a"]["id"]
    assert {r["id"] for r in world.call("GET", "/v1/adapters", "admin").json()["data"]} >= {f"a-cook@{a_id}",
                                                                                           "shared-alpha"}


def test_shared_experts_serve_every_tenant_and_the_owner_serves_its_own(world):
    for who in ("a", "b"):
        answer = world.chat(who, "shared-alpha")
        assert answer.status_code == 200 and answer.headers["x-expert"] == "shared-alpha"
    for model in ("a-cook", "a-mix", "a-cook+shared-alpha"):
        assert world.chat("a", model).status_code == 200, model
    client = openai.OpenAI(base_url=world.url + "/v1", api_key=world.keys["b"], max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="a-cook", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # a shared expert is used, not changed, by a tenant
    assert_openai_error(world.call("DELETE", "/v1/adapters/shared-alpha", "b"), 403)


def _first_logprobs(world, who: str, model: str) -> list[float]:
    answer = world.chat(who, model, max_tokens=6, logprobs=True)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-expert"] == model
    return [item["logprob"] for item in answer.json()["choices"][0]["logprobs"]["content"]]


def test_each_tenant_names_its_own_experts(world, smollm_adapters):
    """Names are per tenant: B registers an expert named like A's (no 409: that would tell B that A has
    one), each tenant's name serves its own weights, and retiring B's leaves A's."""
    made = world.call("POST", "/v1/adapters", "b", files=upload_files(smollm_adapters["alpha"]),
                      data={"name": "a-cook", "description": "B's own expert, with the shared one's weights"})
    assert made.status_code == 201, made.text
    assert made.json()["id"] == "a-cook" and made.json()["rank"] == 8
    try:
        assert world.call("GET", "/v1/adapters/a-cook", "b").json()["rank"] == 8  # B's: alpha's weights
        assert world.call("GET", "/v1/adapters/a-cook", "a").json()["rank"] == 16  # A's: beta's
        # B's a-cook answers with alpha's weights exactly as the shared expert does; A's with beta's
        alpha = _first_logprobs(world, "b", "shared-alpha")
        assert _first_logprobs(world, "b", "a-cook") == pytest.approx(alpha, abs=1e-5)
        assert _first_logprobs(world, "a", "a-cook") != pytest.approx(alpha, abs=1e-4)
        # in B's namespace, a mixture and a mixture request name B's own
        assert world.chat("b", "a-cook+shared-alpha").status_code == 200
        mixed = world.call("POST", "/v1/adapters", "b", json={"name": "b-blend", "mixture": {"a-cook": 1.0,
                                                                                            "shared-alpha": 0.5}})
        assert mixed.status_code == 201 and mixed.json()["mixture"] == {"a-cook": 1.0, "shared-alpha": 0.5}
        assert world.call("DELETE", "/v1/adapters/b-blend", "b").status_code == 200
        # a shared expert's name is taken for every tenant (they all see it: this tells nothing)
        taken = world.call("POST", "/v1/adapters", "b", files=upload_files(smollm_adapters["alpha"]),
                           data={"name": "shared-alpha"})
        assert_openai_error(taken, 409)
        admin = {r["id"] for r in world.call("GET", "/v1/adapters", "admin").json()["data"]}
        assert {f"a-cook@{world.tenants['a']['id']}", f"a-cook@{world.tenants['b']['id']}"} <= admin
        assert [m["id"] for m in world.call("GET", "/v1/models", "b").json()["data"]].count("a-cook") == 1
        # the admin names a tenant's expert by its ref
        as_admin = world.chat("admin", f"a-cook@{world.tenants['b']['id']}", max_tokens=6, logprobs=True)
        assert as_admin.status_code == 200, as_admin.text
        assert [i["logprob"] for i in as_admin.json()["choices"][0]["logprobs"]["content"]] == pytest.approx(alpha,
                                                                                                        abs=1e-5)
    finally:
        assert world.call("DELETE", "/v1/adapters/a-cook", "b").status_code == 200
    assert world.chat("a", "a-cook").status_code == 200
    assert_openai_error(world.chat("b", "a-cook"), 404)


def test_each_tenant_fetches_its_own_copy_from_an_adapter_source(world):
    """A fetched expert belongs to the tenant whose request fetched it: another tenant asking for the same
    name fetches its own (never learning the first exists), and retiring one copy leaves the other."""
    for who in ("a", "b"):
        answer = world.chat(who, "shelf/cook")
        assert answer.status_code == 200 and answer.headers["x-expert"] == "shelf/cook", answer.text
        assert [m["id"] for m in world.call("GET", "/v1/models", who).json()["data"]].count("shelf/cook") == 1
    admin = {r["id"] for r in world.call("GET", "/v1/adapters", "admin").json()["data"]}
    assert {f"shelf/cook@{world.tenants[who]['id']}" for who in ("a", "b")} <= admin
    assert world.call("DELETE", "/v1/adapters/shelf/cook", "a").status_code == 200
    assert world.chat("b", "shelf/cook").status_code == 200
    assert "shelf/cook" not in [m["id"] for m in world.call("GET", "/v1/models", "a").json()["data"]]
    assert world.call("DELETE", "/v1/adapters/shelf/cook", "b").status_code == 200


def test_auto_routes_only_among_the_experts_the_caller_may_use(world):
    assert wait_until(lambda: world.server.health().get("router") == "ready", 120)  # again after a restart
    prompt = {"messages": [{"role": "user", "content": "Give me a recipe for pancakes."}], "top_k": 10}
    for_a = world.call("POST", "/v1/route", "a", json={"model": "auto", **prompt}).json()
    for_b = world.call("POST", "/v1/route", "b", json={"model": "auto", **prompt}).json()
    assert "a-cook" in [r["expert"] for r in for_a["ranking"]], for_a
    assert not {"a-cook", "a-mix"} & {r["expert"] for r in for_b["ranking"]}, for_b
    assert for_b["decision"]["expert"] not in ("a-cook", "a-mix")


def test_rotation_and_revocation_refuse_the_old_key_on_the_next_request(world):
    world.add_tenant("rotating")
    tenant = world.tenants["rotating"]["id"]
    old = world.keys["rotating"]
    assert world.chat("rotating", "shared-alpha").status_code == 200
    key_id = old.split("-")[1]
    rotated = world.call("POST", f"/v1/tenants/{tenant}/keys/{key_id}/rotate", "admin")
    assert rotated.status_code == 201 and rotated.json()["replaces"] == key_id
    world.keys["rotating"] = rotated.json()["key"]
    assert world.chat("rotating", "shared-alpha").status_code == 200
    refused = httpx.post(world.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {old}"},
                         json={"model": "shared-alpha", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert_openai_error(refused, 401)
    # revoked from the command line, against the database the running server reads
    new_id = world.keys["rotating"].split("-")[1]
    cli = subprocess.run([sys.executable, "-m", "server.startup.cli", "tenants", "revoke", "rotating", new_id],
                         cwd=REPO, env={**os.environ, **world.env}, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert_openai_error(world.chat("rotating", "shared-alpha"), 401)
    listed = world.call("GET", f"/v1/tenants/{tenant}/keys", "admin").json()["data"]
    assert all(k["revoked_at"] for k in listed) and all("key" not in k and "hash" not in k for k in listed)
    assert_openai_error(world.call("GET", "/v1/tenants", "a"), 403)  # tenants are the admin's
    assert_openai_error(httpx.get(world.url + "/v1/models", timeout=30), 401)  # with tenants, a key is needed


def test_limits_answer_429_with_retry_after_and_openai_headers(world, smollm_adapters):
    # one request a minute: the next one is refused however slowly this machine serves the first
    world.add_tenant("limited", {"requests_per_minute": 1, "max_experts": 1})
    first = world.chat("limited", "shared-alpha")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1" and first.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = world.chat("limited", "shared-alpha")
    error = assert_openai_error(refused, 429)
    assert error["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert world.chat("b", "shared-alpha").status_code == 200  # another tenant is not limited by it
    # tokens per minute: the first request spends more than the budget, the next waits for it to refill
    world.add_tenant("tokens", {"tokens_per_minute": 10})
    assert world.chat("tokens", "shared-alpha").status_code == 200
    spent = world.chat("tokens", "shared-alpha")
    assert_openai_error(spent, 429)
    assert spent.headers["x-ratelimit-limit-tokens"] == "10" and spent.headers["x-ratelimit-remaining-tokens"] == "0"
    # the number of experts a tenant may own
    first_expert = world.call("POST", "/v1/adapters", "limited", json={"name": "l-mix", "mixture": {"shared-alpha": 0.5}})
    assert first_expert.status_code == 201, first_expert.text
    over = world.call("POST", "/v1/adapters", "limited", json={"name": "l-mix2", "mixture": {"shared-alpha": 0.7}})
    assert assert_openai_error(over, 429)["code"] == "insufficient_quota"


def test_concurrent_requests_over_a_tenants_limit_are_refused_while_others_are_served(world):
    world.add_tenant("one-at-a-time", {"max_concurrent": 1})
    body = {"model": "shared-alpha", "max_tokens": 24, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to a hundred."}]}
    started = threading.Event()

    def stream():
        with httpx.stream("POST", world.url + "/v1/chat/completions", headers=world.auth("one-at-a-time"),
                          json=body, timeout=120) as response:
            for _ in response.iter_lines():
                started.set()

    runner = threading.Thread(target=stream)
    runner.start()
    try:
        assert started.wait(60)
        assert_openai_error(world.chat("one-at-a-time", "shared-alpha"), 429)
        assert world.chat("b", "shared-alpha").status_code == 200
    finally:
        runner.join(120)
    assert world.chat("one-at-a-time", "shared-alpha").status_code == 200  # its slot was given back


def test_usage_per_tenant_model_and_day(world):
    world.add_tenant("metered")
    assert world.chat("a", "a-cook").status_code == 200
    for model in ("shared-alpha", "shared-alpha", "SmolLM2-135M-Instruct"):
        assert world.chat("metered", model).status_code == 200
    own = world.call("GET", "/v1/usage", "metered").json()["data"]
    by_model = {row["model"]: row for row in own}
    assert by_model["shared-alpha"]["requests"] == 2 and by_model["shared-alpha"]["completion_tokens"] > 0
    assert {row["tenant"] for row in own} == {"metered"}
    everyone = world.call("GET", "/v1/usage", "admin").json()["data"]
    assert {"metered", "a"} <= {row["tenant"] for row in everyone}
    assert {row["tenant"] for row in world.call("GET", "/v1/usage", "b").json()["data"]} <= {"b"}
    assert value(scrape(world.server), "loraplex_tenant_tokens_total", tenant="metered", kind="completion") > 0
    assert "lpx-" not in httpx.get(world.url + "/metrics", timeout=30).text  # never a key


def test_a_restart_keeps_tenants_keys_ownership_and_usage(world):
    world.add_tenant("persisted")
    assert world.chat("persisted", "shared-alpha").status_code == 200
    before = world.call("GET", "/v1/usage", "persisted").json()["data"]
    world.restart()
    assert world.call("GET", "/v1/usage", "persisted").json()["data"] == before
    assert world.chat("a", "a-cook").status_code == 200
    assert_openai_error(world.chat("b", "a-cook"), 404)
    assert world.call("GET", f"/v1/files/{world.file}", "a").status_code == 200
    assert world.call("GET", f"/v1/files/{world.file}", "b").status_code == 404
    assert world.call("GET", "/v1/adapters/a-mix", "a").json()["mixture"] == {"a-cook": 0.5, "shared-alpha": 0.5}


def test_a_requests_spans_reach_an_otlp_receiver_in_the_callers_trace(world):
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    answer = world.chat("a", "a-cook", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert answer.status_code == 200

    def ours():
        return [s for s in list(world.receiver.spans) if s.trace_id.hex() == trace_id]

    wanted = {"POST /v1/chat/completions", "router decision", "queue wait", "prefill", "decode"}
    assert wait_until(lambda: wanted <= {s.name for s in ours()}, 30), sorted(s.name for s in ours())
    spans, by_id = {s.name: s for s in ours()}, {s.span_id: s for s in ours()}

    def ancestors(span):
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            yield span.span_id

    # the request's span is the caller's span's child (FastAPI may add spans of its own, one of the same name)
    [request] = [s for s in ours() if s.parent_span_id.hex() == parent]
    assert request.name == "POST /v1/chat/completions"
    for name in wanted - {request.name}:  # inside the request's span (FastAPI may add spans of its own between)
        assert request.span_id in set(ancestors(spans[name])), (name, sorted(s.name for s in ours()))
    decode = {a.key: a.value.int_value for a in spans["decode"].attributes}
    assert decode["gen_ai.usage.output_tokens"] == answer.json()["usage"]["completion_tokens"]
    assert "stream end" in [event.name for span in ours() for event in span.events]


def test_tenant_administration_answers_in_openai_shape(world):
    world.add_tenant("admin-checks")
    tenant = world.tenants["admin-checks"]["id"]
    assert assert_openai_error(world.call("POST", "/v1/tenants", "admin", json={"name": "admin-checks"}), 409,
                               "name")["code"] == "tenant_exists"
    assert_openai_error(world.call("POST", "/v1/tenants", "admin", json={"name": "../x"}), 400, "name")
    assert_openai_error(world.call("POST", "/v1/tenants", "admin", json={"name": "y", "limits": {"rpm": 1}}), 400,
                        "limits.rpm")
    assert_openai_error(world.call("PATCH", f"/v1/tenants/{tenant}", "admin",
                                   json={"limits": {"max_concurrent": -1}}), 400, "limits.max_concurrent")
    assert_openai_error(world.call("GET", "/v1/tenants/tn-000000000000", "admin"), 404)
    assert_openai_error(world.call("DELETE", f"/v1/tenants/{tenant}/keys/000000000000", "admin"), 404)
    updated = world.call("PATCH", f"/v1/tenants/{tenant}", "admin", json={"limits": {"max_concurrent": 3}})
    assert updated.json()["limits"]["max_concurrent"] == 3
    assert_openai_error(world.call("POST", f"/v1/tenants/{tenant}/keys", "admin-checks"), 403)


def _batch_file(world, who: str, model: str, lines: int = 1) -> str:
    text = "".join(json.dumps({"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}})
                   + "\n" for n in range(lines))
    made = world.call("POST", "/v1/files", who, files={"file": ("in.jsonl", text.encode())},
                      data={"purpose": "batch"})
    assert made.status_code == 200, made.text
    return made.json()["id"]


def _finished_batch(world, who: str, batch_id: str) -> dict:
    assert wait_until(lambda: world.call("GET", f"/v1/batches/{batch_id}", who).json()["status"]
                      in ("completed", "failed", "expired", "cancelled"), 180)
    return world.call("GET", f"/v1/batches/{batch_id}", who).json()


def test_batch_files_batches_and_stored_responses_are_their_tenants(world):
    """The isolation matrix's rows for the endpoints issue 36 added: a batch file, a batch (and its result
    file) and a stored response of A's answer B exactly as absent ones; a batch's lines and a Responses
    request use only the experts their caller may use."""
    ghost_file, ghost_batch = "file-0123456789abcdef012345", "batch_0123456789abcdef012345"
    ghost_response = "resp_0123456789abcdef0123456789abcdef"
    file = _batch_file(world, "a", "a-cook")
    batch = world.call("POST", "/v1/batches", "a", json={"input_file_id": file, "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h"})
    assert batch.status_code == 200 and "_owner" not in batch.json(), batch.text
    batch_id = batch.json()["id"]
    stored = world.call("POST", "/v1/responses", "a", json={"model": "shared-alpha", "input": "hi",
                                                             "max_output_tokens": 2})
    assert stored.status_code == 200, stored.text
    response_id = stored.json()["id"]
    for method, path, kwargs, name, ghost in [
        ("GET", f"/v1/files/{file}", {}, file, ghost_file),
        ("GET", f"/v1/files/{file}/content", {}, file, ghost_file),
        ("DELETE", f"/v1/files/{file}", {}, file, ghost_file),
        ("POST", "/v1/batches", {"json": {"input_file_id": file, "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"}}, file, ghost_file),
        ("GET", f"/v1/batches/{batch_id}", {}, batch_id, ghost_batch),
        ("POST", f"/v1/batches/{batch_id}/cancel", {}, batch_id, ghost_batch),
        ("GET", f"/v1/responses/{response_id}", {}, response_id, ghost_response),
        ("GET", f"/v1/responses/{response_id}/input_items", {}, response_id, ghost_response),
        ("DELETE", f"/v1/responses/{response_id}", {}, response_id, ghost_response),
        ("POST", "/v1/responses", {"json": {"model": "shared-alpha", "input": "hi", "max_output_tokens": 2,
                                            "previous_response_id": response_id}}, response_id, ghost_response),
        ("POST", "/v1/responses", {"json": {"model": "a-cook", "input": "hi", "max_output_tokens": 2}},
         "a-cook", "no-such-expert"),
    ]:
        real = world.call(method, path, "b", **kwargs)
        swapped = json.loads(json.dumps(kwargs).replace(name, ghost))
        absent = world.call(method, path.replace(name, ghost), "b", **swapped)
        assert real.status_code in (400, 404), (method, path, real.text)
        same_absence(real, absent, name, ghost)
    assert file not in [f["id"] for f in world.call("GET", "/v1/files", "b").json()["data"]]
    assert batch_id not in [b["id"] for b in world.call("GET", "/v1/batches", "b").json()["data"]]
    # A still has all of it: B's probes changed nothing
    assert world.call("GET", f"/v1/responses/{response_id}", "a").status_code == 200
    done = _finished_batch(world, "a", batch_id)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 1, done
    output = done["output_file_id"]
    assert world.call("GET", f"/v1/files/{output}/content", "a").status_code == 200
    assert world.call("GET", f"/v1/files/{output}/content", "b").status_code == 404  # the result is A's too
    # B's batch naming A's expert: its line answers what a line naming no such expert answers
    b_batch = world.call("POST", "/v1/batches", "b", json={"input_file_id": _batch_file(world, "b", "a-cook"),
                                                            "endpoint": "/v1/chat/completions",
                                                            "completion_window": "24h"}).json()
    finished = _finished_batch(world, "b", b_batch["id"])
    assert finished["request_counts"] == {"total": 1, "completed": 0, "failed": 1}, finished
    line = json.loads(world.call("GET", f"/v1/files/{finished['error_file_id']}/content", "b").text)
    assert line["response"]["status_code"] == 404 and "a-cook" in line["response"]["body"]["error"]["message"], line


def test_a_batchs_lines_count_against_its_tenants_limits_and_usage(world):
    """A batch line is one of its creator's requests: it spends the tenant's requests per minute and is
    recorded in its usage, so a batch is no way around a tenant's limits."""
    world.add_tenant("batcher", {"requests_per_minute": 2})
    batch = world.call("POST", "/v1/batches", "batcher", json={
        "input_file_id": _batch_file(world, "batcher", "shared-alpha", lines=2), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    done = _finished_batch(world, "batcher", batch.json()["id"])
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}, done
    usage = {row["model"]: row for row in world.call("GET", "/v1/usage", "batcher").json()["data"]}
    assert usage["shared-alpha"]["requests"] == 2 and usage["shared-alpha"]["completion_tokens"] > 0, usage
    # the two lines spent the minute's two requests: an interactive one now waits for the refill
    refused = world.chat("batcher", "shared-alpha")
    assert assert_openai_error(refused, 429)["code"] == "rate_limit_exceeded"
