"""The Batch API with the official openai client: batch files uploaded without the admin key, lines for chat
completions, completions and responses on the base, experts and mixtures, malformed lines as error-file
lines, cancel (on the suite's shared server); limits, missing files, who sees which files, and a restart
that resumes an unfinished batch with no line answered twice and none lost (the tiny model, in process)."""
import io
import json
import time

import openai
import pytest

from tests.support import BASE, assert_openai_error, in_process
from tests.support.harness import wait_until

pytestmark = pytest.mark.integration


def _line(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _chat(model, text, max_tokens=6, **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def _upload(client: openai.OpenAI, lines: list[str]) -> str:
    uploaded = client.files.create(file=("b.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    assert uploaded.purpose == "batch"
    return uploaded.id


def _wait(client, batch_id, statuses=("completed", "failed", "cancelled", "expired"), timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def _results(client, file_id) -> dict[str, dict]:
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"] or line["id"]: line for line in lines}
    assert len(by_id) == len(lines), "a line answered twice"
    return by_id


def test_a_batch_of_chat_lines_on_experts_and_mixtures_with_malformed_lines(client):
    lines = [_line(f"chat-{i}", "/v1/chat/completions", _chat(model, f"Say hello number {i}."))
             for i, model in enumerate([BASE, "alpha", "beta", "alpha+beta"])]
    lines += ["{not json", _line("chat-0", "/v1/chat/completions", _chat(BASE, "again")),  # a repeated custom_id
              json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),  # no custom_id
              _line("other-endpoint", "/v1/completions", {"model": BASE, "prompt": "x"}),
              _line("bad-body", "/v1/chat/completions", {"model": BASE, "messages": []}),
              _line("no-such-expert", "/v1/chat/completions", _chat("nope", "hi")), ""]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "one"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "one"}
    batch = _wait(client, batch.id)
    output, errors = _results(client, batch.output_file_id), _results(client, batch.error_file_id)
    assert batch.status == "completed" and batch.completed_at and batch.in_progress_at
    counts = (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed)
    assert counts == (10, 4, 6), errors
    assert set(output) == {f"chat-{i}" for i in range(4)}
    for line in output.values():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["response"]["body"]["choices"][0]["message"]["content"]
    assert output["chat-3"]["response"]["body"]["model"] == "alpha+beta"
    codes = {key: (line["error"] or {}).get("code") or line["response"]["status_code"] for key, line in errors.items()}
    assert sorted(codes.values(), key=str) == sorted(
        ["invalid_json_line", "duplicate_custom_id", "missing_custom_id", "mismatched_endpoint", 400, 404], key=str)
    assert errors["bad-body"]["response"]["body"]["error"]["param"] == "messages"
    assert errors["no-such-expert"]["response"]["body"]["error"]["code"] == "model_not_found"
    # a batch line's answer is the interactive endpoint's
    direct = client.chat.completions.create(**_chat("alpha", "Say hello number 1."))
    assert output["chat-1"]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert batch.id in [b.id for b in client.batches.list()]


def test_completions_and_responses_lines(client):
    for endpoint, body in (("/v1/completions", {"model": "beta", "prompt": "Once upon a time", "max_tokens": 5,
                                                "temperature": 0}),
                           ("/v1/responses", {"model": "alpha", "input": "Hi!", "max_output_tokens": 5,
                                              "temperature": 0})):
        lines = [_line(f"{endpoint}-{i}", endpoint, body) for i in range(2)]
        batch = _wait(client, client.batches.create(input_file_id=_upload(client, lines), endpoint=endpoint,
                                                    completion_window="24h").id)
        assert batch.request_counts.completed == 2 and batch.error_file_id is None
        bodies = [line["response"]["body"] for line in _results(client, batch.output_file_id).values()]
        kind = "text_completion" if endpoint == "/v1/completions" else "response"
        assert all(b["object"] == kind for b in bodies)
        assert len({json.dumps(b.get("choices") or b.get("output")[0]["content"]) for b in bodies}) == 1  # greedy


def test_a_cancelled_batch_keeps_what_finished(server, client):
    # short lines finish at once; long ones (no EOS) are still decoding when the batch is cancelled
    lines = [_line(f"c{i}", "/v1/chat/completions",
                   _chat(BASE, f"Count to {i}.", max_tokens=2) if i % 2 == 0 else
                   _chat(BASE, f"Count to {i}.", max_tokens=300, ignore_eos=True)) for i in range(12)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 120, 0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert 2 <= batch.request_counts.completed < 12
    output = _results(client, batch.output_file_id)
    assert len(output) == batch.request_counts.completed
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing
    # its lines left the engine with it: nothing decodes on for a batch nobody wants (the server is shared)
    assert wait_until(lambda: server.health()["running"] + server.health()["waiting"] == 0, 10, 0.1), server.health()


# ---- limits and keys, and resuming after a crash: the tiny model in this process --------------------------

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
TRAINING = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_limits_missing_files_and_who_may_see_what(tiny_folder, tmp_path):
    with in_process(tiny_folder, tmp_path / "data", router=False, max_batch_lines=4, api_key=["user-key"],
                    admin_key=["admin-key"]) as (state, client):
        model = state.base.name
        lines = [_line(f"x{i}", "/v1/completions", {"model": model, "prompt": "hi"}) for i in range(5)]
        too_many = client.post("/v1/files", headers=USER, data={"purpose": "batch"},
                               files={"file": ("b.jsonl", "\n".join(lines).encode())})
        error = assert_openai_error(too_many, 400, param="file")
        assert "has 5 requests, over this server's limit of 4 per batch" in error["message"]
        empty = client.post("/v1/files", headers=USER, data={"purpose": "batch"}, files={"file": ("b", b"\n\n")})
        assert "no request lines" in assert_openai_error(empty, 400, param="file")["message"]
        uploaded = client.post("/v1/files", headers=USER, data={"purpose": "batch"},
                               files={"file": ("b.jsonl", "\n".join(lines[:4]).encode())}).json()
        state.settings.max_batch_lines = 3  # the limit went down after the upload: creating the batch says so
        create = {"input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
        error = assert_openai_error(client.post("/v1/batches", headers=USER, json=create), 400, param="input_file_id")
        assert "has 4 requests, over this server's limit of 3" in error["message"]
        missing = client.post("/v1/batches", headers=USER, json={**create, "input_file_id": "file-nope"})
        assert_openai_error(missing, 404, param="input_file_id")
        assert_openai_error(client.get("/v1/batches/batch_nope", headers=USER), 404, param="batch_id")
        assert_openai_error(client.post("/v1/batches", headers=USER, json={**create, "completion_window": "1h"}),
                            400, param="completion_window")
        assert_openai_error(client.get("/v1/batches"), 401)  # the API key guards batches too
        # a list's limit is a whole number: "20.0" is refused, not read as 20 (the fuzz suite found it)
        for path in ("/v1/batches", "/v1/fine_tuning/jobs"):
            assert_openai_error(client.get(f"{path}?limit=20.0", headers=ADMIN), 400, param="limit")
            assert client.get(f"{path}?limit=2", headers=ADMIN).status_code == 200
        # training files stay the admin key's: an API key can neither upload nor see them
        as_user = client.post("/v1/files", headers=USER, data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", TRAINING.encode())})
        assert_openai_error(as_user, 401)
        as_admin = client.post("/v1/files", headers=ADMIN, data={"purpose": "fine-tune"},
                               files={"file": ("t.jsonl", ((TRAINING + "\n") * 8).encode())})
        assert as_admin.status_code == 200, as_admin.text
        training_id = as_admin.json()["id"]
        assert [f["id"] for f in client.get("/v1/files", headers=USER).json()["data"]] == [uploaded["id"]]
        assert_openai_error(client.get(f"/v1/files/{training_id}/content", headers=USER), 404)
        assert training_id in [f["id"] for f in client.get("/v1/files", headers=ADMIN).json()["data"]]
        wrong_purpose = client.post("/v1/batches", headers=ADMIN, json={**create, "input_file_id": training_id})
        assert "purpose" in assert_openai_error(wrong_purpose, 404)["message"]


def test_a_restart_resumes_an_unfinished_batch_with_no_line_answered_twice_and_none_lost(tiny_folder, tmp_path):
    data = tmp_path / "data"
    settings = {"max_batch_size": 2, "batch_concurrency": 2}
    with in_process(tiny_folder, data, router=False, **settings) as (state, client):
        model = state.base.name
        lines = [_line(f"r{i}", "/v1/completions", {"model": model, "prompt": f"Line {i}", "max_tokens": 12,
                                                    "temperature": 0}) for i in range(10)]
        lines.insert(5, "{broken")
        file_id = client.post("/v1/files", data={"purpose": "batch"},
                              files={"file": ("b.jsonl", "\n".join(lines).encode())}).json()["id"]
        batch_id = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                    "completion_window": "24h"}).json()["id"]
        assert wait_until(lambda: client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] >= 2,
                          120, 0.05)
    # the process ends with lines in the engine; a crash can also leave half a line at the end of the output
    output = data / "batches" / batch_id / "output.jsonl"
    answered_before = len(output.read_text().splitlines())
    assert 2 <= answered_before < 10
    with open(output, "a") as handle:
        handle.write('{"id": "batch_req_0000000b')
    with in_process(tiny_folder, data, router=False, **settings) as (state, client):
        assert wait_until(lambda: client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed", 120, 0.1)
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["request_counts"] == {"total": 11, "completed": 10, "failed": 1}
        results = [json.loads(line) for line in client.get(f"/v1/files/{batch['output_file_id']}/content").text
                   .splitlines()]
        assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(10))  # each once
        errors = client.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()
        assert [json.loads(line)["error"]["code"] for line in errors] == ["invalid_json_line"]
        # a resumed line's answer is the one it would have had
        direct = client.post("/v1/completions", json={"model": model, "prompt": "Line 9", "max_tokens": 12,
                                                      "temperature": 0}).json()
        line = next(r for r in results if r["custom_id"] == "r9")
        assert line["response"]["body"]["choices"][0]["text"] == direct["choices"][0]["text"]
