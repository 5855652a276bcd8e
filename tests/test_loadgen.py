"""The load generator's statistics on synthetic timings, and a short real run against the server."""
import asyncio

import pytest

from loadtests.loadgen import RequestResult, check_loopback, markdown, percentile, report, run, summarize


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 90) == 90
    assert percentile([10, 0, 20], 100) == 20


def test_summary_of_synthetic_requests():
    results = [
        RequestResult("a", 200, start=0.0, end=2.0, first_token=0.5, token_times=[0.5, 1.0, 2.0], completion_tokens=3),
        RequestResult("b", 200, start=1.0, end=4.0, first_token=1.5, token_times=[1.5, 2.5], completion_tokens=2),
        RequestResult("b", 429, start=1.0, end=1.1),
        RequestResult("a", 0, start=2.0, end=2.5),
    ]
    s = summarize(results)
    assert s["wall_s"] == 4.0 and s["ok"] == 2 and s["requests"] == 4
    assert s["requests_per_s"] == 0.5 and s["output_tokens_per_s"] == 5 / 4
    assert s["errors_by_status"] == {"429": 1, "0": 1}
    assert s["ttft_s"]["p50"] == 0.5  # 0.5 and 0.5
    assert s["inter_token_s"]["p50"] == 1.0  # gaps 0.5, 1.0, 1.0
    assert s["e2e_s"]["p99"] == pytest.approx(2.99)
    full = report(results)
    assert set(full["per_model"]) == {"a", "b"} and full["per_model"]["b"]["errors_by_status"] == {"429": 1}
    assert "| a |" in markdown(full)


def test_only_loopback_targets():
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:1")
    check_loopback("http://[::1]:8000")
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(SystemExit):
            check_loopback(url)


@pytest.mark.integration
@pytest.mark.parametrize("scenario, stream", [("steady", True), ("burst", False)])
def test_smoke_run_against_the_server(server, scenario, stream):
    results = asyncio.run(run(server.base_url, scenario, ["alpha", "SmolLM2-135M-Instruct"], concurrency=3,
                              requests=6, max_tokens=8, stream=stream, duration_s=60))
    summary = report(results)
    overall = summary["overall"]
    assert overall["ok"] == 6 and overall["output_tokens"] == 48  # ignore_eos: exactly max_tokens each
    assert overall["output_tokens_per_s"] > 0 and overall["e2e_s"]["p50"] > 0
    for result in results:  # the timings it recorded are the server's answer as it arrived
        assert result.start < result.first_token <= result.end
        if stream:  # one arrival per streamed chunk (8 tokens: at least 2 chunks), in order
            assert len(result.token_times) >= 2 and result.token_times == sorted(result.token_times)
            assert result.token_times[0] == result.first_token and result.token_times[-1] <= result.end
        else:  # a non-streamed answer arrives at once: its first token is its whole body
            assert result.token_times == []
    assert (overall["inter_token_s"]["p50"] is not None) == stream
    assert set(summary["per_model"]) == {"alpha", "SmolLM2-135M-Instruct"}
