"""A registration that fails after its files are committed leaves nothing behind (fault injection).

The server runs in-process on the tiny random Llama, so a step of the registration can be made
to fail: indexing the expert for the router, or writing the manifest (a full disk). The request
fails, and the name, the files, the engine's entry and the router's entry are all gone; the same
name registers cleanly afterwards. And a manifest entry an older version wrote with unencodable
text does not stop the server or its router at the next start.
"""
import json

import pytest

from tests.support.harness import wait_until
from tests.support import in_process, write_lora

ADMIN = {"Authorization": "Bearer k"}


@pytest.fixture
def inproc(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "tiny", width=128)
    with in_process(tiny_folder, tmp_path / "data", admin_key=["k"], adapter_roots=[str(roots)]) as (state, client):
        yield state, client, roots


def _nothing_left(state, roots, name):
    assert state.registry.get(name) is None
    assert name not in state.router.classifier.experts()
    # no committed files, no staging folder (the engine frees a retired adapter's files in the background)
    assert wait_until(lambda: not list((state.store.root / "store").iterdir()), 10)
    assert name not in state.store.read_manifest()
    assert state.engine.call(lambda _: state.engine.adapter_counts()).result(10) == {"device": 0, "cpu": 0, "disk": 0}


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("step", ["index", "manifest"])
def test_a_failing_late_step_rolls_the_whole_registration_back(inproc, monkeypatch, step):
    state, client, roots = inproc
    body = {"name": "tiny", "path": str(roots / "tiny"), "description": "Tiny things.", "examples": ["a tiny one"]}
    target = state.router.classifier if step == "index" else state.store
    monkeypatch.setattr(target, "add" if step == "index" else "add_entry", _boom)
    response = client.post("/v1/adapters", json=body, headers=ADMIN)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    _nothing_left(state, roots, "tiny")
    monkeypatch.undo()
    again = client.post("/v1/adapters", json=body, headers=ADMIN)
    assert again.status_code == 201, again.text
    assert "tiny" in state.router.classifier.experts() and "tiny" in state.store.read_manifest()
    routed = client.post("/v1/route", json={"messages": [{"role": "user", "content": "a tiny one"}]})
    assert routed.json()["ranking"][0]["expert"] == "tiny"


def test_a_manifest_entry_with_unencodable_text_is_kept_but_not_served(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "tiny", width=128)
    data = tmp_path / "data"
    settings = {"admin_key": ["k"], "adapter_roots": [str(roots)]}
    with in_process(tiny_folder, data, **settings) as (state, client):
        for name in ("good", "bad"):
            assert client.post("/v1/adapters", headers=ADMIN, json={"name": name, "path": str(roots / "tiny"),
                                                                    "description": name}).status_code == 201
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["adapters"]["bad"]["description"] = "\ud800"  # as a version before the check could write it
    (data / "manifest.json").write_text(json.dumps(manifest))

    with in_process(tiny_folder, data, **settings) as (state, client):  # the router comes up (it died here before)
        assert client.get("/health").json()["router"] == "ready"
        assert [a["id"] for a in client.get("/v1/adapters", headers=ADMIN).json()["data"]] == ["good"]
        auto = client.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "good"}]})
        assert auto.status_code == 200 and auto.headers["x-expert"] == "good"
    assert "bad" in json.loads((data / "manifest.json").read_text())["adapters"]  # not lost
