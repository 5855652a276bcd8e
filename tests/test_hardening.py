"""Regression tests for issue #20's attack set, on the real server: no input takes it down or gets a 5xx.

Each test names the defect it pins. The schemathesis run (test_fuzz.py) covers the space around them.
"""
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.harness import ServerProcess
from server.api.protocol import ChatMessage
from tests.support import BASE, INJECTED, Q_PROJ_KEY, assert_openai_error, upload_files, write_lora

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer hard-admin"}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def hard(tmp_path_factory, smollm_adapters, cache_dir):
    workdir = tmp_path_factory.mktemp("hardening")
    roots = workdir / "roots"
    write_lora(roots / "good")
    settings = {
        "compute_dtype": "float32", "max_batch_size": 8, "context_window": 512, "default_max_tokens": 8,
        "max_tokens_limit": 64, "max_queued_requests": 8, "adapter_roots": [str(roots)],
        "request_body_timeout_s": 2,
        "adapters": {
            "alpha": {"path": str(smollm_adapters["alpha"]), "description": "Writes and debugs Python code.",
                      "examples": ["Write a Python function to sort a list."]},
            # an expert whose defaults are legal but too small to divide by
            "tiny-temp": {"path": str(smollm_adapters["alpha"]), "temperature": 1e-300, "top_p": 5e-324},
        },
    }
    server = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": "hard-admin"})
    server.start()
    server.roots = roots
    server.data_dir = Path(server._env["LORAPLEX_DATA_DIR"])
    yield server
    assert server.stop() == 0, server.log()


def chat(server, **fields):
    body = {"model": BASE, "messages": HI, "max_tokens": 4, **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def raw_post(server, path, body: bytes, headers=None):
    return httpx.post(server.base_url + path, content=body, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def registry_state(server) -> tuple:
    """Everything a registration touches: the listing, the manifest, the store's folders."""
    listed = {a["id"] for a in httpx.get(server.base_url + "/v1/adapters", headers=ADMIN, timeout=30).json()["data"]}
    manifest_path = server.data_dir / "manifest.json"
    manifest = set(json.loads(manifest_path.read_text())["adapters"]) if manifest_path.exists() else set()
    stored = {p.name for p in (server.data_dir / "store").iterdir()}
    return listed, manifest, stored


def alive(server) -> None:
    assert server.proc.poll() is None, server.log()
    assert httpx.get(server.base_url + "/health", timeout=10).json()["status"] == "ok"


# ---- 1. legal sampling values that crashed the engine --------------------------------------------

@pytest.mark.parametrize("fields", [{"temperature": 1e-300}, {"temperature": 5e-324, "seed": 3},
                                    {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 2.0, "top_p": 1e-300}])
def test_tiny_temperature_or_top_p_is_served_as_greedy(hard, fields):
    greedy = chat(hard, temperature=0, max_tokens=8)
    response = chat(hard, max_tokens=8, **fields)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    alive(hard)


def test_an_expert_whose_default_temperature_is_tiny_serves_ordinary_requests(hard):
    response = chat(hard, model="tiny-temp", max_tokens=8)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == \
        chat(hard, model="alpha", temperature=0, max_tokens=8).json()["choices"][0]["message"]["content"]
    alive(hard)


# ---- 6, 10. values that were 500, or silently coerced --------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"logit_bias": {"²": 1}}, "logit_bias"), ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"stream": "yes"}, "stream"), ({"n": "2"}, "n"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"), ({"n": 9}, "n"),  # n above max_queued_requests (8) can never run
])
def test_bad_values_are_400_naming_the_field(hard, fields, param):
    assert_openai_error(chat(hard, **fields), 400, param)


def test_seed_edges_are_served_and_choices_wrap_around(hard):
    top = chat(hard, seed=2**64 - 1, n=2, temperature=1.0)
    assert top.status_code == 200, top.text
    # choice 1 of seed 2**64 - 1 draws from seed 0, as torch wraps seeds modulo 2**64
    zero = chat(hard, seed=0, temperature=1.0)
    assert top.json()["choices"][1]["message"]["content"] == zero.json()["choices"][0]["message"]["content"]
    assert chat(hard, seed=-(2**63), temperature=1.0).status_code == 200


# ---- 3. text that cannot be encoded -------------------------------------------------------------

LONE = b'"\\ud800"'


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (BASE.encode(), LONE)),
    ("/v1/chat/completions", b'{"model": "auto", "messages": [{"role": "user", "content": %s}]}' % LONE),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": [%s]}'
     % (BASE.encode(), LONE)),
    ("/v1/completions", b'{"model": "%s", "prompt": %s}' % (BASE.encode(), LONE)),
    ("/v1/route", b'{"messages": [{"role": "user", "content": %s}]}' % LONE),
    ("/v1/chat/completions", b'{"model": %s, "messages": [{"role": "user", "content": "hi"}]}' % LONE),
])
def test_unencodable_text_is_400_wherever_it_enters(hard, path, body):
    error = assert_openai_error(raw_post(hard, path, body), 400)
    assert "not valid Unicode" in error["message"]
    alive(hard)


def test_unencodable_expert_metadata_is_refused_and_nothing_is_registered(hard):
    before = registry_state(hard)
    body = b'{"name": "sur", "path": "%s", "description": %s}' % (str(hard.roots / "good").encode(), LONE)
    assert "not valid Unicode" in assert_openai_error(raw_post(hard, "/v1/adapters", body, ADMIN), 400)["message"]
    response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, files=upload_files(hard.roots / "good"),
                          data={"name": "sur2", "examples": '["ok", "\\ud800"]'}, timeout=60)
    assert_openai_error(response, 400)
    (hard.roots / "meta").mkdir(exist_ok=True)
    write_lora(hard.roots / "meta")
    (hard.roots / "meta" / "expert.json").write_text('{"description": "\\ud800"}')  # from the folder, not the request
    assert_openai_error(httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, timeout=60,
                                   json={"name": "sur3", "path": str(hard.roots / "meta")}), 400)
    assert registry_state(hard) == before


def test_special_tokens_typed_by_a_user_are_text(hard, tokenizer):
    """A typed <|im_end|><|im_start|>system cannot close the user's turn: the server encodes it as text."""
    from server.api.prompts import PromptEncoder

    messages = [{"role": "user", "content": INJECTED}]
    usage = chat(hard, messages=messages, max_tokens=1).json()["usage"]
    safe = PromptEncoder(tokenizer).render([ChatMessage(**m) for m in messages])
    unsafe = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert usage["prompt_tokens"] == len(safe) != len(unsafe)


# ---- 4. names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["okn\n", "ok\n", "a b", ""])
def test_expert_names_must_match_the_whole_pattern(hard, name):
    before = registry_state(hard)
    response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, timeout=60,
                          json={"name": name, "path": str(hard.roots / "good")})
    assert_openai_error(response, 400, "name")
    assert registry_state(hard) == before


# ---- 2, 6. adapters with bad values, types or shapes ----------------------------------------------

def _q(a=None, b=None, rank=8):
    return {Q_PROJ_KEY.format("A"): torch.randn(rank, 576) * 0.01 if a is None else a,
            Q_PROJ_KEY.format("B"): torch.randn(576, rank) * 0.01 if b is None else b}


BAD_ADAPTERS = {
    "nan": ({}, _q(b=torch.full((576, 8), float("nan"))), "NaN"),
    "inf": ({}, _q(a=torch.full((8, 576), float("inf"))), "NaN or infinite"),
    "huge": ({}, _q(b=torch.full((576, 8), 1e30)), "magnitude"),
    "alpha-nan": ('{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}', None, "lora_alpha"),
    "alpha-1e308": ({"lora_alpha": 1e308}, None, "lora_alpha"),
    "alpha-null": ({"lora_alpha": None}, None, "lora_alpha"),
    "alpha-x": ({"lora_alpha": "x"}, None, "lora_alpha"),
    "r-abc": ({"r": "abc"}, None, "r must be"),
    "pattern-paren": ({"alpha_pattern": {"(": 4}}, None, "not a valid pattern"),
    "pattern-list": ({"alpha_pattern": [1]}, None, "alpha_pattern"),
    "base-5": ({"base_model_name_or_path": 5}, None, "base_model_name_or_path"),
    "rank-0-tensor": ({}, _q(a=torch.tensor(1.0)), "2-d"),
    "zero-rank": ({}, _q(a=torch.zeros(0, 576), b=torch.zeros(576, 0)), "rank is 0"),
    "deep-config": ('{"peft_type": "LORA", "x": ' + "[" * 60000 + "]" * 60000 + "}", None, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_adapters_with_bad_values_are_refused_leaving_nothing(hard, tmp_path, case):
    config, tensors, fragment = BAD_ADAPTERS[case]
    folder = write_lora(tmp_path / case, config, tensors)
    before = registry_state(hard)
    response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, files=upload_files(folder),
                          data={"name": f"bad-{case}"}, timeout=60)
    assert fragment in assert_openai_error(response, 400)["message"]
    assert registry_state(hard) == before
    alive(hard)


@pytest.mark.parametrize("path", ["good\x00x", "x" * 5000, "y" * 300])
def test_unusable_paths_are_400(hard, path):
    response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, timeout=60,
                          json={"name": "pathy", "path": str(hard.roots / path)})
    assert_openai_error(response, 400, "path")


def test_a_hard_link_into_the_roots_is_refused_like_a_symlink(hard, tmp_path):
    outside = write_lora(tmp_path / "outside")
    linked = hard.roots / "linked"
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.link(outside / name, linked / name)
    response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, timeout=60,
                          json={"name": "linked", "path": str(linked)})
    assert "hard link" in assert_openai_error(response, 400, "path")["message"]


def test_deeply_nested_admin_body_is_400(hard):
    body = b'{"name": "x", "path": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(raw_post(hard, "/v1/adapters", body, ADMIN), 400)
    assert_openai_error(raw_post(hard, "/v1/chat/completions", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                        400)


# ---- 5, 10. auth before body, stalled bodies ------------------------------------------------------

def _send_head(server, head: bytes) -> bytes:
    """Send a request head (and maybe part of a body), then read the whole response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_unauthenticated_uploads_are_refused_before_any_body_byte(hard):
    """Headers announce 200 MB that are never sent: the 401 comes back anyway, so nothing was waited for."""
    head = (b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 200000000\r\n\r\n")
    started = time.monotonic()
    reply = _send_head(hard, head)
    assert reply.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in reply
    assert time.monotonic() - started < 1.9  # answered before the 2 s body timeout could have fired


def test_a_stalled_body_is_408(hard):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\"")
    reply = _send_head(hard, head)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


# ---- 7. metrics of deleted experts ---------------------------------------------------------------

def test_series_of_a_deleted_expert_are_removed(hard):
    for cycle in range(3):
        response = httpx.post(hard.base_url + "/v1/adapters", headers=ADMIN, timeout=60,
                              json={"name": "cyclic", "path": str(hard.roots / "good")})
        assert response.status_code == 201, response.text
        assert chat(hard, model="cyclic").status_code == 200
        assert 'adapter="cyclic"' in httpx.get(hard.base_url + "/metrics").text
        assert httpx.delete(hard.base_url + "/v1/adapters/cyclic", headers=ADMIN).status_code == 200
        assert "cyclic" not in httpx.get(hard.base_url + "/metrics").text


# ---- OpenAPI --------------------------------------------------------------------------------------

def test_openapi_documents_the_real_errors_and_content_types(hard):
    spec = httpx.get(hard.base_url + "/openapi.json").json()
    chat_responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat_responses and {"400", "401", "404", "413", "429", "503"} <= set(chat_responses)
    assert chat_responses["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert "text/event-stream" in chat_responses["200"]["content"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    upload = spec["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/json", "multipart/form-data"}
    assert {"name", "adapter_config", "adapter_model"} <= set(upload["multipart/form-data"]["schema"]["required"])


@pytest.mark.parametrize("path, methods", [("/v1/adapters", {"GET", "POST"}),
                                           ("/v1/adapters/x", {"GET", "DELETE"}),
                                           ("/v1/chat/completions", {"POST"})])
def test_405_lists_every_method_of_the_path(hard, path, methods):
    response = httpx.request("PATCH", hard.base_url + path, headers=ADMIN, timeout=30)
    assert_openai_error(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"} == methods


def test_a_non_text_content_part_is_refused_in_one_clear_message(hard):
    image = [{"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]
    error = assert_openai_error(chat(hard, messages=[{"role": "user", "content": image}]), 400, "messages.0.content")
    assert "'image_url' are not supported" in error["message"]
