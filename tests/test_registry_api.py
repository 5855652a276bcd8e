"""Registering, using, listing and retiring experts over HTTP on the real server, and restarts."""
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from adapters.store import AdapterStore
from tests.support.harness import ServerProcess, wait_until
from tests.support import BASE, assert_openai_error

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer admin-two"}
QUESTION = "What is the capital of France?"


def write_adapter(folder: Path, rank: int, in_features: int = 576, out_features: int = 576) -> Path:
    """A LoRA on q_proj of layer 0, written the way peft saves it."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.randn(rank, in_features) * 0.01,
               key.format("B"): torch.randn(out_features, rank) * 0.01}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def layout(tmp_path_factory, smollm_adapters):
    root = tmp_path_factory.mktemp("registry")
    roots = root / "roots"
    roots.mkdir()
    outside = root / "outside"
    outside.mkdir()
    shutil.copytree(smollm_adapters["alpha"], roots / "alpha")
    shutil.copytree(smollm_adapters["beta"], roots / "beta")
    shutil.copytree(smollm_adapters["alpha"], outside / "alpha")
    write_adapter(roots / "rank64", 64)
    write_adapter(roots / "other-base", 8, in_features=128, out_features=128)
    pickled = roots / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    os.symlink(outside / "alpha", roots / "escape")
    return {"root": root, "roots": roots, "outside": outside, "data": root / "data"}


def start_server(layout, cache_dir):
    settings = {"compute_dtype": "float32", "max_batch_size": 8, "max_adapter_rank": 32, "max_gpu_adapters": 2,
                "max_cpu_adapters": 1, "default_max_tokens": 32, "adapter_roots": [str(layout["roots"])],
                "auto_model_names": ["auto", "pick-for-me"]}
    env = {"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": "admin-one,admin-two",
           "LORAPLEX_DATA_DIR": str(layout["data"])}
    return ServerProcess(layout["root"], settings, env=env).start()


@pytest.fixture(scope="module")
def admin_server(layout, cache_dir):
    server = start_server(layout, cache_dir)
    yield server
    server.stop()


def register(server, headers=ADMIN, **body):
    return httpx.post(server.base_url + "/v1/adapters", json=body, headers=headers, timeout=120)


def upload(server, name, folder: Path, headers=ADMIN, **fields):
    files = {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    data = {"name": name, **{k: json.dumps(v) if isinstance(v, list) else v for k, v in fields.items()}}
    return httpx.post(server.base_url + "/v1/adapters", data=data, files=files, headers=headers, timeout=120)


def answer(server, model, max_tokens=16, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": max_tokens, **extra}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def ensure(server, name: str, folder: Path) -> None:
    """Register `name` from `folder` unless it is already there: each test sets up what it needs."""
    if name not in listed(server):
        created = register(server, name=name, path=str(folder))
        assert created.status_code == 201, created.text


def store_state(layout) -> tuple:
    """The registry's files: the store's folders (staging ones included) and the manifest's text."""
    manifest = layout["data"] / "manifest.json"
    return (sorted(p.name for p in (layout["data"] / "store").iterdir()),
            manifest.read_text() if manifest.exists() else "")


def delete(server, name, headers=ADMIN):
    return httpx.delete(server.base_url + f"/v1/adapters/{name}", headers=headers, timeout=60)


def listed(server) -> set[str]:
    response = httpx.get(server.base_url + "/v1/adapters", headers=ADMIN, timeout=30)
    assert response.status_code == 200
    return {a["id"] for a in response.json()["data"]}


def test_register_by_path_and_use_it_in_the_next_request(admin_server, layout):
    base_text = answer(admin_server, BASE)["message"]["content"]
    created = register(admin_server, name="alpha-first", path=str(layout["roots"] / "alpha"),
                       description="test expert", examples=["Hi"], stop=["</end>"])
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["rank"] == 8 and info["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert info["source"] == "path" and info["size_bytes"] > 0
    text = answer(admin_server, "alpha-first")["message"]["content"]
    assert text != base_text
    shown = httpx.get(admin_server.base_url + "/v1/adapters/alpha-first", headers=ADMIN).json()
    assert shown["requests"] == 1 and shown["tier"] == "device" and shown["stop"] == ["</end>"]
    models = httpx.get(admin_server.base_url + "/v1/models").json()["data"]
    assert {"id": "alpha-first", "parent": BASE}.items() <= next(m for m in models if m["id"] == "alpha-first").items()


def test_register_by_upload_serves_the_same_weights(admin_server, layout):
    ensure(admin_server, "alpha-path", layout["roots"] / "alpha")
    if "alpha-up" in listed(admin_server):
        assert delete(admin_server, "alpha-up").status_code == 200
    assert upload(admin_server, "alpha-up", layout["roots"] / "alpha", examples=["a", "b"]).status_code == 201
    assert answer(admin_server, "alpha-up") == answer(admin_server, "alpha-path")
    assert httpx.get(admin_server.base_url + "/v1/adapters/alpha-up", headers=ADMIN).json()["source"] == "upload"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"name": "p1", "path": "PICKLED"}, 400, "pickle"),
        ({"name": "p2", "path": "TRAVERSAL"}, 400, "outside the adapter roots"),
        ({"name": "p3", "path": "ESCAPE"}, 400, "outside the adapter roots"),
        ({"name": "p4", "path": "OTHER_BASE"}, 400, "do not fit"),
        ({"name": "p5", "path": "RANK64"}, 400, "max rank 32"),
        ({"name": "alpha-path", "path": "ALPHA"}, 409, "already registered"),
        ({"name": "bad name!", "path": "ALPHA"}, 400, "1-128 characters"),
        ({"name": BASE, "path": "ALPHA"}, 400, "reserved"),
        ({"name": "auto", "path": "ALPHA"}, 400, "reserved"),
        ({"name": "pick-for-me", "path": "ALPHA"}, 400, "reserved"),  # a configured router name
        ({"name": "p6"}, 400, "path"),
        ({"name": "p7", "path": "ALPHA", "stop": [""]}, 400, "stop"),
        ({"name": "p8", "path": "ALPHA", "stop_token_ids": [10**6]}, 400, "vocabulary"),
    ],
)
def test_refusals_leave_nothing_behind(admin_server, layout, body, status, fragment):
    paths = {"PICKLED": layout["roots"] / "pickled", "TRAVERSAL": f"{layout['roots']}/../../etc",
             "ESCAPE": layout["roots"] / "escape", "OTHER_BASE": layout["roots"] / "other-base",
             "RANK64": layout["roots"] / "rank64", "ALPHA": layout["roots"] / "alpha"}
    if "path" in body:
        body = {**body, "path": str(paths[body["path"]])}
    ensure(admin_server, "alpha-path", layout["roots"] / "alpha")  # what the 409 case collides with
    before = (listed(admin_server), store_state(layout))
    error = assert_openai_error(register(admin_server, **body), status)
    assert fragment in error["message"]
    assert (listed(admin_server), store_state(layout)) == before


def test_pickle_upload_is_refused(admin_server, layout):
    folder = layout["root"] / "pickle-upload"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.safetensors")
    before = (listed(admin_server), store_state(layout))
    assert "pickle" in assert_openai_error(upload(admin_server, "pk", folder), 400)["message"]
    assert (listed(admin_server), store_state(layout)) == before  # no staging folder, no files, no entry


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer nope"}, 401),
                                             ({"Authorization": "Basic admin-one"}, 401)])
def test_admin_key_is_required(admin_server, layout, headers, status):
    assert_openai_error(register(admin_server, headers=headers, name="k1", path=str(layout["roots"] / "alpha")), status)
    assert_openai_error(httpx.get(admin_server.base_url + "/v1/adapters", headers=headers), status)
    assert_openai_error(delete(admin_server, "alpha-path", headers=headers), status)


def test_registration_is_disabled_without_an_admin_key(server):
    error = assert_openai_error(httpx.post(server.base_url + "/v1/adapters", json={"name": "x", "path": "/tmp"}), 403)
    assert "LORAPLEX_ADMIN_KEY" in error["message"]


def test_eviction_and_reload_keep_answers(admin_server, layout):
    ensure(admin_server, "alpha-path", layout["roots"] / "alpha")
    ensure(admin_server, "alpha-up", layout["roots"] / "alpha")
    ensure(admin_server, "beta-path", layout["roots"] / "beta")
    first = {name: answer(admin_server, name) for name in ("alpha-path", "beta-path", "alpha-up")}
    tiers = {a["id"]: a["tier"] for a in httpx.get(admin_server.base_url + "/v1/adapters", headers=ADMIN).json()["data"]}
    assert list(tiers.values()).count("device") <= 2  # max_gpu_adapters
    again = {name: answer(admin_server, name) for name in ("beta-path", "alpha-path", "alpha-up")}
    assert again == first


def test_delete_while_streaming_finishes_the_stream_then_404(admin_server, layout):
    assert register(admin_server, name="doomed", path=str(layout["roots"] / "beta")).status_code == 201
    folder = next(p for p in (layout["data"] / "store").iterdir() if p.name.startswith("doomed-"))
    body = {"model": "doomed", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 200,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    frames = []

    def stream():
        with httpx.stream("POST", admin_server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
            frames.extend(line for line in r.iter_lines() if line)

    worker = threading.Thread(target=stream)
    worker.start()
    assert wait_until(lambda: admin_server.health()["running"] == 1, 30)
    assert delete(admin_server, "doomed").status_code == 200
    # the delete really happened mid-stream: the stream is still generating on the retired weights
    assert admin_server.health()["running"] == 1
    assert_openai_error(httpx.post(admin_server.base_url + "/v1/chat/completions", json={**body, "stream": False}), 404)
    worker.join(120)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["usage"]["completion_tokens"] == 200
    assert wait_until(lambda: not folder.exists(), 10)  # freed once the stream was done
    assert_openai_error(delete(admin_server, "doomed"), 404)


def test_registration_and_retirement_update_the_router(admin_server, layout):
    assert wait_until(lambda: admin_server.health()["router"] == "ready", 120)
    question = {"messages": [{"role": "user", "content": "When should I plant tulip bulbs in my garden?"}]}
    created = upload(admin_server, "gardener", layout["roots"] / "alpha", description="Gardening help.",
                     examples=["How do I grow tomatoes?", "Why are my plant's leaves yellow?",
                               "When should I prune roses?"])
    assert created.status_code == 201
    route = httpx.post(admin_server.base_url + "/v1/route", json=question, timeout=30).json()
    assert route["decision"]["expert"] == "gardener" and route["decision"]["source"] == "classifier"
    assert delete(admin_server, "gardener").status_code == 200
    route = httpx.post(admin_server.base_url + "/v1/route", json=question, timeout=30).json()
    assert route["decision"]["source"] == "fallback"
    assert "gardener" not in [r["expert"] for r in route["ranking"]]


def test_racing_registrations_deletions_and_traffic_lose_nothing(admin_server, layout):
    ensure(admin_server, "alpha-path", layout["roots"] / "alpha")
    names = [f"race{i}" for i in range(10)]
    errors = []

    def traffic():
        for _ in range(6):
            try:
                answer(admin_server, "alpha-path", max_tokens=4)
            except AssertionError as exc:
                errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        talkers = [pool.submit(traffic) for _ in range(2)]
        created = list(pool.map(lambda n: upload(admin_server, n, layout["roots"] / "alpha").status_code, names))
        deleted = list(pool.map(lambda n: delete(admin_server, n).status_code, names[:5]))
        for talker in talkers:
            talker.result()
    assert created == [201] * 10 and deleted == [200] * 5 and not errors
    expected = set(names[5:])
    assert expected <= listed(admin_server) and not (set(names[:5]) & listed(admin_server))
    manifest = json.loads((layout["data"] / "manifest.json").read_text())["adapters"]
    assert expected <= set(manifest) and not (set(names[:5]) & set(manifest))
    for name in names[5:]:
        assert answer(admin_server, name, max_tokens=4)["finish_reason"] in ("stop", "length")


def test_restart_serves_exactly_the_registered_experts(layout, cache_dir, tmp_path):
    """On a server of its own (it stops it): the module's server stays up for the other tests."""
    own = {**layout, "root": tmp_path, "data": tmp_path / "data"}
    first = start_server(own, cache_dir)
    try:
        ensure(first, "beta-path", layout["roots"] / "beta")
        assert upload(first, "alpha-up", layout["roots"] / "alpha").status_code == 201
        before = listed(first)
        reference = answer(first, "beta-path")
    finally:
        assert first.stop() == 0
    layout = own
    # a crash between copying files and writing the manifest leaves an unnamed store folder
    store = AdapterStore(layout["data"])
    staging = store.staging_dir()
    shutil.copy(layout["roots"] / "alpha" / "adapter_config.json", staging)
    shutil.copy(layout["roots"] / "alpha" / "adapter_model.safetensors", staging)
    orphan = store.commit_files(staging, "half-registered-0123")
    restarted = start_server(layout, cache_dir)
    try:
        assert listed(restarted) == before
        assert not orphan.exists()
        assert answer(restarted, "beta-path") == reference
    finally:
        assert restarted.stop() == 0
