"""/metrics after a known mix of traffic on a fresh server: exact counts, tokens equal to usage."""
import json

import httpx
import openai
import pytest

from tests.support.harness import ServerProcess, wait_until
from tests.support import BASE, ask, scrape, value

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory, smollm_adapters, cache_dir):
    settings = {"compute_dtype": "float32", "max_batch_size": 4,
                "adapters": {name: {"path": str(smollm_adapters[name])} for name in ("alpha", "beta")}}
    server = ServerProcess(tmp_path_factory.mktemp("metrics"), settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    yield server
    server.stop()


def test_metrics_after_a_known_mix_of_traffic(fresh_server):
    client = openai.OpenAI(base_url=fresh_server.base_url + "/v1", api_key="x", max_retries=0)
    usage = {"alpha": [], BASE: []}
    for question in ("Hi", "Name a color."):
        usage["alpha"].append(ask(client, "alpha", question, max_tokens=5).usage)
    chunks = list(ask(client, BASE, "Hi", max_tokens=6, stream=True, stream_options={"include_usage": True}))
    usage[BASE].append(chunks[-1].usage)
    tagged = client.chat.completions.with_raw_response.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_headers={"X-Request-Id": "req-42"})
    assert tagged.headers["x-request-id"] == "req-42"
    usage[BASE].append(tagged.parse().usage)
    with pytest.raises(openai.NotFoundError):
        ask(client, "ghost", "Hi")
    assert httpx.post(fresh_server.base_url + "/v1/chat/completions", json={"model": BASE}).status_code == 400
    body = {"model": "beta", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", fresh_server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)

    assert wait_until(lambda: value(scrape(fresh_server), "loraplex_requests_total", adapter="beta") == 1, 10)
    assert wait_until(lambda: value(scrape(fresh_server), "loraplex_requests_running") == 0, 10)
    samples = scrape(fresh_server)
    requests = "loraplex_requests_total"
    assert value(samples, requests, adapter="alpha", status="200") == 2
    assert value(samples, requests, adapter=BASE, status="200") == 2
    assert value(samples, requests, adapter="beta", status="200", finish_reason="cancelled") == 1
    assert value(samples, requests, adapter="none", status="404") == 1
    assert value(samples, requests, adapter="none", status="400") == 1
    assert value(samples, requests) == 7
    for adapter in ("alpha", BASE):
        assert value(samples, "loraplex_generation_tokens_total", adapter=adapter) == sum(
            u.completion_tokens for u in usage[adapter])
        assert value(samples, "loraplex_prompt_tokens_total", adapter=adapter) == sum(
            u.prompt_tokens for u in usage[adapter])
    assert value(samples, "loraplex_time_to_first_token_seconds_count", adapter="alpha") == 2
    assert value(samples, "loraplex_time_to_first_token_seconds_count", adapter="beta") == 1
    assert value(samples, "loraplex_e2e_request_latency_seconds_count", adapter=BASE) == 2
    assert value(samples, "loraplex_e2e_request_latency_seconds_count", adapter="beta") == 0
    assert value(samples, "loraplex_queue_wait_seconds_count") == 5
    assert value(samples, "loraplex_inter_token_latency_seconds_count", adapter="alpha") == sum(
        u.completion_tokens - 1 for u in usage["alpha"])
    assert value(samples, "loraplex_router_decisions_total", source="model", expert="alpha") == 2
    assert value(samples, "loraplex_router_decisions_total", source="base") == 2
    assert value(samples, "loraplex_process_resident_memory_bytes") > 100e6
    assert value(samples, "loraplex_adapters_resident", tier="device") == 2
    assert ("loraplex_accelerator_memory_allocated_bytes", ()) in samples

    log_lines = [json.loads(line.split(": ", 1)[1]) for line in fresh_server.log().splitlines()
                 if "loraplex.requests:" in line]
    tagged_line = next(line for line in log_lines if line["request_id"] == "req-42")
    assert tagged_line["adapter"] == BASE and tagged_line["status"] == 200 and tagged_line["finish_reason"]
    assert tagged_line["completion_tokens"] == usage[BASE][1].completion_tokens and tagged_line["ttft_s"] > 0


def test_metrics_can_require_the_admin_key(tmp_path, cache_dir):
    server = ServerProcess(tmp_path, {"metrics_require_admin": True},
                           env={"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": "k"}).start()
    try:
        assert httpx.get(server.base_url + "/metrics").status_code == 401
        assert httpx.get(server.base_url + "/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    finally:
        server.stop()
