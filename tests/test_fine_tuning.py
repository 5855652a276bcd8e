"""Files and fine-tuning jobs over HTTP, on the real app in-process with a tiny random Llama as the
base (training it takes seconds): a job validates, trains in a worker process, registers its adapter
and serves; bad files name their lines; cancel kills the run; jobs queue; a restart resumes a job
from its checkpoint. The default model end to end through the openai client: tests/test_fine_tuning_api.py."""
import json
import time

import pytest
import torch

from tests.support.harness import wait_until
from tests.support import assert_openai_error, in_process

ADMIN = {"Authorization": "Bearer k"}


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Say the code word number {i}."},
                         {"role": "assistant", "content": f"Banana {i}."}]}


def jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n").encode()


def upload(client, data: bytes, purpose="fine-tune", name="train.jsonl"):
    return client.post("/v1/files", headers=ADMIN, data={"purpose": purpose}, files={"file": (name, data)})


def create(client, file_id, **body):
    return client.post("/v1/fine_tuning/jobs", headers=ADMIN,
                       json={"model": "tiny", "training_file": file_id, **body})


def job(client, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json()


def wait_status(client, job_id, statuses, timeout=180):
    assert wait_until(lambda: job(client, job_id)["status"] in statuses, timeout), job(client, job_id)
    return job(client, job_id)


def events(client, job_id):
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]


@pytest.fixture
def tiny(tiny_folder, tmp_path):
    settings = dict(admin_key=["k"], served_model_name="tiny", fine_tune_checkpoint_every=2, router=False)
    return tiny_folder, tmp_path / "data", settings


def test_a_job_trains_registers_and_serves(tiny):
    folder, data, settings = tiny
    with in_process(folder, data, **settings) as (state, client):
        file = upload(client, jsonl(conversation(i) for i in range(24)))
        assert file.status_code == 200, file.text
        file = file.json()
        assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["id"].startswith("file-")
        assert client.get(f"/v1/files/{file['id']}/content", headers=ADMIN).content == jsonl(
            conversation(i) for i in range(24))
        assert [f["id"] for f in client.get("/v1/files", headers=ADMIN).json()["data"]] == [file["id"]]
        validation = upload(client, jsonl(conversation(i) for i in range(100, 104))).json()
        created = create(client, file["id"], validation_file=validation["id"], suffix="banana", seed=3,
                         hyperparameters={"n_epochs": 2, "batch_size": 8}, description="Says banana.",
                         examples=["Say the code word."], stop=["</b>"])
        assert created.status_code == 200, created.text
        created = created.json()
        assert created["object"] == "fine_tuning.job" and created["status"] == "validating_files"
        assert created["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0}
        done = wait_status(client, created["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        model = done["fine_tuned_model"]
        assert model == f"ft:tiny:banana:{created['id']}"
        assert done["trained_tokens"] > 0 and done["finished_at"] >= done["created_at"]
        assert done["loraplex"]["steps_done"] == done["loraplex"]["total_steps"] == 6  # 24 / 8 x 2 epochs
        messages = [e["message"] for e in reversed(events(client, created["id"]))]
        for expected in ("Created fine-tuning job", "Files validated: 24 conversations", "Fine-tuning job started",
                         "Step 6/6: training loss=", "Checkpoint created at step 6", "New fine-tuned model created",
                         "The job has successfully completed"):
            assert any(m.startswith(expected) for m in messages), (expected, messages)
        steps = [e for e in events(client, created["id"]) if e["type"] == "metrics"]
        assert len(steps) == 6 and {"step", "train_loss", "learning_rate"} <= set(steps[0]["data"])
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{created['id']}/checkpoints", headers=ADMIN).json()["data"]
        assert [c["step_number"] for c in checkpoints] == [6, 4, 2]
        assert all(c["metrics"]["valid_loss"] > 0 for c in checkpoints)  # the validation file is scored
        # it serves, as any registered expert: listed, with the job's metadata, answering chats
        assert model in [m["id"] for m in client.get("/v1/models").json()["data"]]
        expert = client.get(f"/v1/adapters/{model}", headers=ADMIN).json()
        assert expert["source"] == "fine-tune" and expert["stop"] == ["</b>"] and expert["description"] == "Says banana."
        assert expert["examples"] == ["Say the code word."] and done["loraplex"]["router_examples_from"] == "request"
        chat = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 3,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["model"] == model
        listed = client.get("/v1/fine_tuning/jobs?limit=1", headers=ADMIN).json()
        assert [j["id"] for j in listed["data"]] == [created["id"]] and listed["has_more"] is False
        # a job keeps its own copy of the file: deleting the upload leaves it intact
        assert client.delete(f"/v1/files/{file['id']}", headers=ADMIN).json()["deleted"] is True
        assert_openai_error(client.get(f"/v1/files/{file['id']}", headers=ADMIN), 404)


def test_a_job_given_no_examples_is_routed_by_prompts_of_its_training_file(tiny):
    """A fine-tuned expert is reachable through `auto` without hand-written examples: 24 of its training
    prompts, spread through the file, become its routing examples (in the job, the registry and expert.json)."""
    folder, data, settings = tiny
    with in_process(folder, data, **{**settings, "router": True}) as (state, client):
        file = upload(client, jsonl(conversation(i) for i in range(48))).json()
        created = create(client, file["id"], hyperparameters={"n_epochs": 1, "batch_size": 16},
                         description="Says banana.").json()
        done = wait_status(client, created["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        assert done["loraplex"]["router_examples"] == 24 and done["loraplex"]["router_examples_from"] == "training_file"
        expected = [f"Say the code word number {i}." for i in range(0, 48, 2)]
        expert = client.get(f"/v1/adapters/{done['fine_tuned_model']}", headers=ADMIN).json()
        assert expert["examples"] == expected and expert["description"] == "Says banana."
        saved = json.loads((data / "fine_tuning" / "jobs" / created["id"] / "train" / "expert.json").read_text())
        assert saved["examples"] == expected  # the adapter folder, copied elsewhere, keeps them
        messages = [e["message"] for e in events(client, created["id"])]
        assert "No routing examples given: 24 prompts of the training file route to the expert" in messages
        assert wait_until(lambda: done["fine_tuned_model"] in state.router.classifier.experts(), 30)
        route = client.post("/v1/route", json={"model": "auto", "messages": [
            {"role": "user", "content": "Say the code word number 77."}]}).json()
        assert route["decision"]["expert"] == done["fine_tuned_model"], route


def test_bad_files_and_bad_jobs_are_refused_with_what_is_wrong(tiny):
    folder, data, settings = tiny
    with in_process(folder, data, max_file_bytes=4096, **settings) as (state, client):
        bad = jsonl([conversation(1), "{oops", {"messages": [{"role": "user", "content": "no answer"}]},
                     {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]}])
        refused = upload(client, bad)
        assert_openai_error(refused, 400, param="file")
        message = refused.json()["error"]["message"]
        for line in ("line 2: not valid JSON", "line 3: no assistant turn", "line 4: every message needs a role",
                     "line 5: "):
            assert line in message, message
        assert "over the limit of 256" in message  # the context window
        assert_openai_error(upload(client, b""), 400, param="file")
        assert_openai_error(upload(client, b"\xff\xfe"), 400, param="file")
        assert_openai_error(upload(client, jsonl([conversation(1)]), purpose="assistants"), 400, param="purpose")
        assert_openai_error(upload(client, b"x" * 5000), 413)
        assert_openai_error(client.post("/v1/files", headers=ADMIN, json={"purpose": "fine-tune"}), 400)
        assert_openai_error(client.post("/v1/files", data={"purpose": "fine-tune"},
                                        files={"file": ("t.jsonl", jsonl([conversation(1)]))}), 401)
        assert client.get("/v1/files", headers=ADMIN).json()["data"] == []  # nothing kept from refusals
        good = upload(client, jsonl(conversation(i) for i in range(8))).json()["id"]
        for body, param in (({"model": "gpt-4o-mini"}, "model"), ({"training_file": "file-nope"}, "training_file"),
                            ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                            ({"hyperparameters": {"n_epochs": "3"}}, None),
                            ({"hyperparameters": {"batch_size": 8}, "method": {"type": "supervised"}},
                             "hyperparameters"),
                            ({"method": {"type": "dpo"}}, None), ({"target_modules": ["lm_head"]}, "target_modules"),
                            ({"rank": 4096}, None), ({"suffix": "has space"}, None)):
            response = create(client, good, **body)
            assert_openai_error(response, 400, **({"param": param} if param else {}))
        assert_openai_error(client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=ADMIN), 404)
        assert client.get("/v1/fine_tuning/jobs", headers=ADMIN).json()["data"] == []


def engine_threads(state) -> int:
    return state.engine.call(lambda _: torch.get_num_threads()).result(10)


def test_cancel_stops_a_running_job_within_seconds_and_jobs_queue(tiny):
    folder, data, settings = tiny
    with in_process(folder, data, **settings) as (state, client):
        idle_threads = engine_threads(state)
        file = upload(client, jsonl(conversation(i) for i in range(16))).json()["id"]
        long = create(client, file, hyperparameters={"n_epochs": 50, "batch_size": 2}).json()["id"]
        short = create(client, file, hyperparameters={"n_epochs": 1, "batch_size": 8}).json()["id"]
        assert wait_until(lambda: any(e["type"] == "metrics" for e in events(client, long)), 180)
        assert job(client, long)["status"] == "running"
        assert job(client, short)["status"] == "queued"  # one job at a time: the second waits its turn
        # serving leaves the training run its core (OpenMP threads beyond the free cores stall every op)
        assert engine_threads(state) == max(1, idle_threads - 1)
        started = time.monotonic()
        cancelled = client.post(f"/v1/fine_tuning/jobs/{long}/cancel", headers=ADMIN)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert time.monotonic() - started < 10
        assert cancelled.json()["fine_tuned_model"] is None
        assert "The job was cancelled" in [e["message"] for e in events(client, long)]
        done = wait_status(client, short, ("succeeded", "failed"))  # the queue moves on
        assert done["status"] == "succeeded", done["error"]
        assert_openai_error(client.post(f"/v1/fine_tuning/jobs/{short}/cancel", headers=ADMIN), 400)
        assert wait_until(lambda: engine_threads(state) == idle_threads, 10)  # and takes it back after
        again = client.post(f"/v1/fine_tuning/jobs/{long}/cancel", headers=ADMIN)
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_jobs_submitted_within_one_second_list_and_run_in_submission_order(tiny):
    """`created_at` has whole seconds: the order of jobs created in the same second must still be the
    order they were submitted in, for the listing and for the queue (and so after a restart)."""
    folder, data, settings = tiny
    with in_process(folder, data, **settings) as (state, client):
        file = upload(client, jsonl(conversation(i) for i in range(16))).json()["id"]
        ids = [create(client, file, hyperparameters={"n_epochs": 50, "batch_size": 2}).json()["id"] for _ in range(6)]
        listed = client.get("/v1/fine_tuning/jobs?limit=10", headers=ADMIN).json()["data"]
        assert [j["id"] for j in listed] == ids[::-1]  # newest first, as OpenAI lists them
        assert wait_until(lambda: job(client, ids[0])["status"] == "running", 60)
        assert wait_until(lambda: [job(client, i)["status"] for i in ids[1:]] == ["queued"] * 5, 30)
        for job_id in ids:
            assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ADMIN).json()["status"] == "cancelled"


def test_a_restart_resumes_a_running_job_from_its_checkpoint(tiny):
    folder, data, settings = tiny
    with in_process(folder, data, **settings) as (state, client):
        file = upload(client, jsonl(conversation(i) for i in range(16))).json()["id"]
        job_id = create(client, file, hyperparameters={"n_epochs": 12, "batch_size": 4}).json()["id"]
        assert wait_until(lambda: any(e["message"].startswith("Checkpoint created at step 4")
                                      for e in events(client, job_id)), 180)
    # the server stopped mid-job: the worker was killed, the job is still "running" on disk
    with in_process(folder, data, **settings) as (state, client):
        done = wait_status(client, job_id, ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        messages = [e["message"] for e in reversed(events(client, job_id))]
        assert any("resumes from its last checkpoint" in m for m in messages)
        resumed_at = messages.index("Fine-tuning job started (resuming from its last checkpoint)")
        first_step_after = next(m for m in messages[resumed_at:] if m.startswith("Step "))
        assert int(first_step_after.split()[1].split("/")[0]) > 4  # continued, not started over
        assert done["loraplex"]["steps_done"] == 48
        assert done["fine_tuned_model"] in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_fine_tuning_turned_off_is_404(tiny):
    folder, data, settings = tiny
    with in_process(folder, data, **{**settings, "fine_tuning": False}) as (state, client):
        error = assert_openai_error(client.get("/v1/fine_tuning/jobs", headers=ADMIN), 404)
        assert "fine_tuning: false" in error["message"]
        # files still serve batches; a training file is refused
        assert client.get("/v1/files", headers=ADMIN).status_code == 200
        refused = client.post("/v1/files", headers=ADMIN, data={"purpose": "fine-tune"}, files={"file": ("t", b"{}")})
        assert "fine_tuning: false" in assert_openai_error(refused, 404)["message"]
