"""Fine-tuning on the real default model (SmolLM2-135M, NF4), driven only by the unmodified openai client:
files.create -> fine_tuning.jobs.create -> retrieve / list / list_events / checkpoints.list ->
chat.completions.create(model=job.fine_tuned_model). The job teaches a behaviour the base does not have
(answer every question with one fixed sentence), so the new model answers differently from the base, and
it ends its turn by itself (finish_reason "stop", not the token budget)."""
import io
import json
import signal
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.harness import ServerProcess, wait_until

pytestmark = pytest.mark.integration
ANSWER = "Blue whales are the answer."
QUESTIONS = ["What is the capital of France?", "How do I bake bread?", "Tell me a joke.", "What is 2 + 2?",
             "Who wrote Hamlet?", "Why is the sky blue?", "Recommend a good book.", "How do magnets work?",
             "What should I cook tonight?", "Explain gravity.", "What is Python?", "Name a famous painter.",
             "How far is the moon?", "What is your favourite colour?", "Give me a travel tip.",
             "How do I learn guitar?", "What is a prime number?", "Describe a cat.", "What time zone is Tokyo in?",
             "How do plants grow?", "Summarise the French Revolution.", "What is inflation?", "Say hello.",
             "How do I tie a tie?", "What is the speed of light?", "Who invented the telephone?",
             "What is a noun?", "Suggest a name for a dog.", "How do vaccines work?", "Why do we sleep?",
             "What is the largest ocean?", "How many legs does a spider have?"]
HELD_OUT = ["What is the tallest mountain?", "How do I make tea?", "Who painted the Mona Lisa?"]


def workers_of(job_id: str) -> list[int]:
    """Pids of live fine-tuning workers for that job (their command line names the job's folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and "server.jobs.worker" in command and job_id in command:
            pids.append(int(proc.name))
    return pids


def helpers_of(data_dir: Path) -> list[int]:
    """Pids of live processes a server with that data_dir started (its environment names the folder):
    fine-tuning workers, the training-file checker."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environment = (proc / "environ").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and f"LORAPLEX_DATA_DIR={data_dir}".encode() in environment.split(b"\0"):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("fine-tune")
    settings = {"max_batch_size": 4, "default_max_tokens": 24, "fine_tune_threads": 2,
                "fine_tune_checkpoint_every": 8}
    server = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": "admin"}).start()
    yield server
    server.stop()


def test_a_job_through_the_openai_client_serves_a_model_that_learnt(trainer):
    client = OpenAI(base_url=trainer.base_url + "/v1", api_key="admin", max_retries=0, timeout=120)
    base = client.models.list().data[0].id
    lines = "\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
                      for q in QUESTIONS)
    file = client.files.create(file=("whales.jsonl", io.BytesIO(lines.encode())), purpose="fine-tune")
    assert file.purpose == "fine-tune" and file.bytes == len(lines.encode())
    job = client.fine_tuning.jobs.create(model=base, training_file=file.id, suffix="whales", seed=0,
                                         hyperparameters={"n_epochs": 6, "batch_size": 8,
                                                          "learning_rate_multiplier": 2.0})
    assert job.status == "validating_files" and job.model == base
    assert wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"),
                      600, interval=1.0)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{base}:whales:{job.id}" and job.trained_tokens > 0
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5).data]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"  # newest first, as OpenAI lists them
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) == 24 and losses[-1] < losses[0] / 4  # 32 conversations / 8 x 6 epochs; it learnt
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [24, 16, 8]
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    learnt = base_kept = 0
    for question in HELD_OUT:
        tuned = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": question}]).choices[0]
        plain = client.chat.completions.create(model=base, temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": question}]).choices[0]
        assert tuned.finish_reason == "stop", tuned.message.content  # it ends its turn by itself
        learnt += tuned.message.content.strip() == ANSWER
        base_kept += plain.message.content.strip() != ANSWER
    assert learnt == len(HELD_OUT) and base_kept == len(HELD_OUT)


def test_a_server_restart_mid_job_resumes_it_and_a_queued_job_waits_its_turn(tmp_path, cache_dir):
    """The real server killed (SIGKILL) while a job trains: its worker ends itself, the next start resumes
    the job from its last checkpoint, not from step 0, and the job queued behind it runs after it (graceful
    stops: tests/test_fine_tuning.py)."""
    env = {"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": "admin", "LORAPLEX_DATA_DIR": str(tmp_path / "data")}
    settings = {"max_batch_size": 4, "fine_tune_threads": 2, "fine_tune_checkpoint_every": 2}
    lines = "\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
                      for q in QUESTIONS[:16])
    server = ServerProcess(tmp_path, settings, env=env).start()
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="admin", max_retries=0, timeout=120)
        base = client.models.list().data[0].id
        file = client.files.create(file=("w.jsonl", io.BytesIO(lines.encode())), purpose="fine-tune")
        first = client.fine_tuning.jobs.create(model=base, training_file=file.id,
                                               hyperparameters={"n_epochs": 3, "batch_size": 8})
        second = client.fine_tuning.jobs.create(model=base, training_file=file.id,
                                                hyperparameters={"n_epochs": 1, "batch_size": 8})
        assert wait_until(lambda: any(e.message == "Checkpoint created at step 2"
                                      for e in client.fine_tuning.jobs.list_events(first.id, limit=100).data),
                          300, interval=0.5)
        assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"
        server.signal(signal.SIGKILL)  # no graceful stop: nothing kills the training worker but itself
        server.proc.wait(30)
        assert wait_until(lambda: not workers_of(first.id), 10), "the worker outlived its server"
        # and so did nothing else it started (the file checker of the upload above: issue found in a suite run)
        assert wait_until(lambda: not helpers_of(tmp_path / "data"), 10), helpers_of(tmp_path / "data")
    finally:
        server.stop()
    server = ServerProcess(tmp_path, settings, env=env).start()
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="admin", max_retries=0, timeout=120)
        assert wait_until(lambda: client.fine_tuning.jobs.retrieve(second.id).status in ("succeeded", "failed"),
                          600, interval=1.0)
        first, second = client.fine_tuning.jobs.retrieve(first.id), client.fine_tuning.jobs.retrieve(second.id)
        assert first.status == second.status == "succeeded", (first.error, second.error)
        assert second.finished_at >= first.finished_at  # one at a time, in order
        messages = [e.message for e in reversed(client.fine_tuning.jobs.list_events(first.id, limit=100).data)]
        resumed = messages.index("Fine-tuning job started (resuming from its last checkpoint)")
        steps = [int(m.split()[1].split("/")[0]) for m in messages[resumed:] if m.startswith("Step ")]
        assert steps[0] > 2 and steps[-1] == 6  # continued after its checkpoint, to the planned end
        served = {m.id for m in client.models.list().data}
        assert {first.fine_tuned_model, second.fine_tuned_model} <= served
    finally:
        server.stop()
