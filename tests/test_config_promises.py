"""Settings the README promises, each shown working on the real app and engine (in-process, tiny Llama).

API keys on every inference endpoint, an expert as the router's fallback, the upload size limit,
base_mismatch refuse / warn, int8 quantization, and PEFT's rank_pattern.
"""
import json

import pytest
import torch

from tests.support import in_process, upload_files, write_lora

ADMIN = {"Authorization": "Bearer admin"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def roots(tmp_path):
    folder = tmp_path / "roots"
    write_lora(folder / "tiny", width=128, config={"base_model_name_or_path": "some/other-model"})
    (folder / "tiny" / "expert.json").write_text(json.dumps({"description": "Gardening: plants, soil, watering.",
                                                             "examples": ["How often should I water tomatoes?"]}))
    return folder


def test_api_keys_guard_every_inference_endpoint(tiny_folder, tmp_path):
    with in_process(tiny_folder, tmp_path / "data", router=False, api_key=["user-key"],
                    admin_key=["admin"]) as (state, client):
        calls = [("get", "/v1/models", None), ("get", f"/v1/models/{state.base.name}", None),
                 ("post", "/v1/route", {"messages": HELLO}),
                 ("post", "/v1/chat/completions", {"model": state.base.name, "messages": HELLO, "max_tokens": 1}),
                 ("post", "/v1/completions", {"model": state.base.name, "prompt": "Hi", "max_tokens": 1}),
                 ("post", "/v1/responses", {"model": state.base.name, "input": "Hi", "max_output_tokens": 1}),
                 ("get", "/v1/batches", None), ("get", "/v1/files", None),  # batch files are the API key's
                 ("post", "/tokenize", {"prompt": "Hi"}), ("post", "/detokenize", {"tokens": [1]})]
        for method, path, body in calls:
            kwargs = {"json": body} if body else {}
            missing = getattr(client, method)(path, **kwargs)
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key", path
            assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
            for key in ("user-key", "admin"):  # an admin key works for inference too
                ok = getattr(client, method)(path, headers={"Authorization": f"Bearer {key}"}, **kwargs)
                assert ok.status_code == 200, (path, ok.text)
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        # a user key is no admin key: not for the registry, router corrections, training files or fine-tuning
        for method, path in (("get", "/v1/adapters"), ("post", "/v1/router/corrections"), ("get", "/v1/fine_tuning/jobs"),
                             ("post", "/v1/fine_tuning/jobs"), ("get", "/v1/fine_tuning/jobs/ftjob-x/events")):
            refused = getattr(client, method)(path, headers={"Authorization": "Bearer user-key"})
            assert refused.status_code == 401, (path, refused.status_code)
        training = client.post("/v1/files", headers={"Authorization": "Bearer user-key"}, data={"purpose": "fine-tune"},
                               files={"file": ("t.jsonl", b"{}")})
        assert training.status_code == 401 and "admin key" in training.json()["error"]["message"]
        assert client.get("/v1/files", headers=ADMIN).status_code == 200


def test_an_expert_can_be_the_routers_fallback(tiny_folder, tmp_path, roots):
    adapters = {"tiny": {"path": str(roots / "tiny")}, "helper": {"path": str(roots / "tiny")}}
    with in_process(tiny_folder, tmp_path / "data", router_fallback="helper", base_mismatch="warn",
                    adapters=adapters) as (state, client):
        off_topic = client.post("/v1/chat/completions", json={
            "model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "Who won the 1966 World Cup?"}]})
        assert off_topic.status_code == 200
        assert off_topic.headers["x-expert"] == "helper" and off_topic.headers["x-router-source"] == "fallback"
        on_topic = client.post("/v1/chat/completions", json={
            "model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "How often should I water "
                                                                                          "my tomato plants?"}]})
        assert on_topic.headers["x-expert"] == "tiny" and on_topic.headers["x-router-source"] == "classifier"


def test_uploads_over_max_adapter_bytes_are_413_and_leave_nothing(tiny_folder, tmp_path, roots):
    size = (roots / "tiny" / "adapter_model.safetensors").stat().st_size
    with in_process(tiny_folder, tmp_path / "data", router=False, admin_key=["admin"], base_mismatch="warn",
                    max_adapter_bytes=size - 1) as (state, client):
        response = client.post("/v1/adapters", headers=ADMIN, files=upload_files(roots / "tiny"), data={"name": "big"})
        assert response.status_code == 413 and response.json()["error"]["param"] == "adapter_model"
        assert client.get("/v1/adapters", headers=ADMIN).json()["data"] == []
        assert not list((tmp_path / "data" / "store").iterdir())


@pytest.mark.parametrize("mode, status", [("refuse", 400), ("warn", 201)])
def test_base_mismatch_refuses_or_warns(tiny_folder, tmp_path, roots, mode, status):
    with in_process(tiny_folder, tmp_path / "data", router=False, admin_key=["admin"], adapter_roots=[str(roots)],
                    base_mismatch=mode) as (state, client):
        response = client.post("/v1/adapters", headers=ADMIN, json={"name": "tiny", "path": str(roots / "tiny")})
        assert response.status_code == status, response.text
        if status == 400:
            assert "some/other-model" in response.json()["error"]["message"]
        else:
            chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2})
            assert chat.status_code == 200


def test_int8_quantization_serves_what_the_int8_model_generates(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with in_process(tiny_folder, tmp_path / "data", router=False, quantization="int8") as (state, client):
        layer = state.engine.call(lambda runner: type(runner.layers[0].self_attn.q_proj).__name__).result(10)
        assert layer == "Linear8bitLt"
        reply = client.post("/v1/completions", json={"model": state.base.name, "prompt": [1, 504, 3575],
                                                     "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        served = reply.json()["choices"][0]["text"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32,
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    expected = reference.generate(torch.tensor([[1, 504, 3575]]), max_new_tokens=6, do_sample=False,
                                  eos_token_id=None)[0, 3:]
    assert served == state.base.tokenizer.decode(expected, skip_special_tokens=True)
