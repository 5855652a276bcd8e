"""What adapter-aware gateways need from a replica, on the real app in-process (tiny Llama): the
lora_requests_info series in vLLM's shape (and vLLM's names when asked), and vLLM's
load_lora_adapter / unload_lora_adapter endpoints mapped onto the registry."""
import re
import threading

from tests.support.harness import wait_until
from tests.support import assert_openai_error, in_process, write_lora

ADMIN = {"Authorization": "Bearer k"}
INFO = re.compile(r'^(\S+)\{max_lora="(\d+)",running_lora_adapters="([^"]*)",waiting_lora_adapters="([^"]*)"\} (\S+)$',
                  re.M)


def info(client, name="loraplex_lora_requests_info"):
    return [m.groups()[1:] for m in INFO.finditer(client.get("/metrics").text) if m.group(1) == name]


def test_vllm_adapter_endpoints_and_the_lora_requests_info_series(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "tiny", width=128)
    settings = dict(admin_key=["k"], adapter_roots=[str(roots)], base_mismatch="warn", router=False,
                    max_gpu_adapters=3, vllm_metric_aliases=True, context_window=256, max_tokens_limit=200)
    with in_process(tiny_folder, tmp_path / "data", **settings) as (state, client):
        assert info(client) == [("3", "", "", info(client)[0][3])]  # one series, nothing running
        loaded = client.post("/v1/load_lora_adapter", headers=ADMIN,
                             json={"lora_name": "sql", "lora_path": str(roots / "tiny")})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
        assert "sql" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert client.get("/v1/adapters/sql", headers=ADMIN).json()["source"] == "path"
        assert_openai_error(client.post("/v1/load_lora_adapter", headers=ADMIN,
                                        json={"lora_name": "sql", "lora_path": str(roots / "tiny")}), 409)
        assert_openai_error(client.post("/v1/load_lora_adapter", headers=ADMIN,
                                        json={"lora_name": "x", "lora_path": "/etc"}), 400, param="path")
        assert_openai_error(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "x"}), 400)
        assert_openai_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}), 401)

        # a request on the expert shows in the running set while it decodes
        body = {"model": "sql", "max_tokens": 200, "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]}
        done = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=body))
        done.start()
        assert wait_until(lambda: any(r[1] == "sql" for r in info(client)), 30)
        assert any(r[1] == "sql" for r in info(client, "vllm:lora_requests_info"))  # vLLM's name too
        text = client.get("/metrics").text
        for alias in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                      "vllm:gpu_cache_usage_perc"):
            assert re.search(rf"^{alias} \S+$", text, re.M), alias
        done.join(60)
        assert wait_until(lambda: info(client)[0][1] == "", 10)
        assert len(info(client)) == 1  # the series of earlier sets is not kept

        unloaded = client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "sql"})
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'sql' removed successfully."
        assert_openai_error(client.post("/v1/chat/completions", json=body), 404)
        assert_openai_error(client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "sql"}), 404)


def test_vllm_names_are_off_by_default(tiny_folder, tmp_path):
    with in_process(tiny_folder, tmp_path / "data", router=False) as (state, client):
        text = client.get("/metrics").text
        assert "loraplex_lora_requests_info{" in text and "vllm:" not in text
