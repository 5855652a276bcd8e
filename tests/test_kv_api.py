"""The paged KV cache as a user of the real server sees it: cached tokens in usage, KV metrics,
a memory budget checked at start."""
import json
import uuid

import httpx
import pytest

from tests.support.harness import ServerProcess
from tests.support import BASE, scrape, value

pytestmark = pytest.mark.integration

SYSTEM = ("You are the archivist of a small harbour town. You answer questions about its ships, its weather "
          "and its people in plain sentences, never more than two, and you never invent a name. ") * 3


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(client, server):
    system = f"Session {uuid.uuid4()}. {SYSTEM}"  # nobody has asked this before
    before = scrape(server)

    def ask(question):
        return client.chat.completions.create(
            model=BASE, max_tokens=12, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])

    first = ask("Which ship came in last?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = ask("Which ship came in last?")
    second = ask("What was the weather like?")
    assert again.choices[0].message.content == first.choices[0].message.content  # a hit changes no token
    for reply in (again, second):
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert cached % 16 == 0 and cached >= reply.usage.prompt_tokens - 40  # all but the question's blocks
        assert cached < reply.usage.prompt_tokens
    after = scrape(server)
    hits = value(after, "loraplex_prefix_cache_hit_tokens_total") - value(before, "loraplex_prefix_cache_hit_tokens_total")
    assert hits >= again.usage.prompt_tokens_details.cached_tokens + second.usage.prompt_tokens_details.cached_tokens
    assert value(after, "loraplex_prefix_cache_queried_tokens_total") > value(
        before, "loraplex_prefix_cache_queried_tokens_total")


def test_streamed_usage_carries_cached_tokens_too(server):
    body = {"model": BASE, "messages": [{"role": "system", "content": f"{uuid.uuid4()} {SYSTEM}"},
                                        {"role": "user", "content": "Hello"}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    usages = []
    for _ in range(2):
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        usages.append(json.loads(lines[-1][6:])["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 64


def test_kv_metrics_describe_the_pool(server):
    samples = scrape(server)
    total = value(samples, "loraplex_kv_cache_blocks", state="total")
    # the session server: max_batch_size 8 x context_window 512 tokens in 16-token blocks (auto on CPU)
    assert total == 8 * 512 // 16
    assert 0 <= value(samples, "loraplex_kv_cache_usage_ratio") <= 1
    assert ("loraplex_preemptions_total", ()) in samples


def test_a_budget_that_cannot_hold_one_request_stops_the_server_with_both_numbers(tmp_path, cache_dir):
    server = ServerProcess(tmp_path, {"kv_cache_memory": "4MiB", "compute_dtype": "float32", "router": "none",
                                       "kv_cache_dtype": "float32"},  # the arithmetic below is float32's
                           env={"LORAPLEX_CACHE": cache_dir})
    server.launch()
    assert server.proc.wait(180) == 1
    log = server.log()
    assert "kv_cache_memory (4MiB: 4,194,304 bytes) holds 64 tokens" in log
    assert "needs 2,048 tokens" in log and "Traceback" not in log


def test_a_budget_in_bytes_sizes_the_pool_and_long_requests_still_run(tmp_path, cache_dir):
    """A pool of exactly one full-context request (32 blocks), max_batch_size 4: four requests that start
    in 7 blocks each and grow to 20 cannot all finish together: the newest are preempted and computed
    again, every request still gets its whole answer."""
    block = 46080 * 16  # SmolLM2 in float32: 30 layers x 3 KV heads x 64 x K and V x 4 bytes per token
    settings = {"kv_cache_memory": str(block * (512 // 16 + 1)), "compute_dtype": "float32", "router": "none",
                "kv_cache_dtype": "float32", "context_window": 512, "max_batch_size": 4}
    server = ServerProcess(tmp_path, settings, env={"LORAPLEX_CACHE": cache_dir}).start()
    try:
        import concurrent.futures

        def ask(i):  # distinct prompts: no prefix is shared
            body = {"model": BASE, "max_tokens": 200, "ignore_eos": True,  # ~110 prompt tokens, 7 blocks
                    "messages": [{"role": "user", "content": f"Tell me about river {i}. " * 15}]}
            return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(4)))
        assert [r.status_code for r in replies] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 200 for r in replies)
        samples = scrape(server)
        assert value(samples, "loraplex_kv_cache_blocks", state="total") == 512 // 16
        assert value(samples, "loraplex_preemptions_total") > 0
    finally:
        assert server.stop() == 0
