"""Runs fine-tuning jobs, one at a time by default, each in a worker process, beside serving.

A job goes validating_files -> queued -> running -> succeeded | failed | cancelled (OpenAI's
statuses). One thread here does everything that changes a job: validates files, starts the next
queued job's worker, turns the worker's progress lines into the job's events, kills a cancelled
worker, and, when a worker ends well, hands the adapter to `register` (the registry's usual
admission path) and sets `fine_tuned_model` only once that returned: the model can serve.

A restart loses nothing: at start, a job that was running is queued again with `resume` set, and
its worker continues from the last checkpoint on the exact learning-rate schedule it started with
(training/train.py); one that was validating is validated again.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from server.jobs.store import FileStore, JobStore

log = logging.getLogger("loraplex.jobs")
FINISHED = ("succeeded", "failed", "cancelled")
POLL_S = 0.5
KILL_GRACE_S = 5.0
USER_ERROR = 3  # the worker's exit code for a problem in the data or plan (server/jobs/worker.py)


class JobError(Exception):
    """A job that cannot go on, with a message for the user (the job's `error`)."""

    def __init__(self, message: str, code: str = "invalid_training_file", param: str | None = "training_file"):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class Validated:
    examples: int
    tokens: int  # tokens of all conversations, one epoch
    prompts: tuple[str, ...] = ()  # training prompts: the expert's routing examples when the job gives none


@dataclass
class _Run:
    job_id: str
    process: subprocess.Popen
    progress_offset: int = 0
    cancel_at: float | None = None  # when the kill was asked for


class JobManager:
    """`validate(job) -> Validated` raises JobError; `plan(job) -> dict` is the worker's plan.json;
    `register(job, adapter_folder) -> model name` raises JobError when the adapter is refused."""

    def __init__(self, files: FileStore, jobs: JobStore, validate: Callable[[dict], Validated],
                 plan: Callable[[dict], dict], register: Callable[[dict, Path], str], max_running: int = 1,
                 on_training: Callable[[bool], None] = lambda active: None):
        self.files, self.jobs = files, jobs
        self._on_training = on_training  # told when the first run starts and when the last one ends
        self._validate, self._plan, self._register = validate, plan, register
        self.max_running = max_running
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._runs: dict[str, _Run] = {}
        self._pending: list[str] = []  # validating or queued jobs, oldest first: the loop never lists the disk
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- called from the HTTP side -------------------------------------------------------

    def submit(self, job: dict) -> dict:
        job = self.jobs.create({**job, "status": "validating_files"})
        self.jobs.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        with self._lock:
            self._pending.append(job["id"])
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> dict:
        """Queued or validating: cancelled now. Running: the worker is killed within seconds."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job["status"] in FINISHED:
                return job
            if job_id in self._runs:
                self._cancel.add(job_id)
            else:
                job = self._finish(job_id, "cancelled", None)
        self._wake.set()
        return job

    # ---- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        for job in sorted(self.jobs.list(), key=lambda j: (j["created_at"], j["id"])):
            if job["status"] == "running":
                self.jobs.update(job["id"], status="queued", _resume=True)
                self.jobs.add_event(job["id"], "The server restarted; the job resumes from its last checkpoint")
            if job["status"] not in FINISHED:
                self._pending.append(job["id"])
        self._thread = threading.Thread(target=self._loop, name="loraplex-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Kill running workers (their jobs resume at the next start) and end the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for run in list(self._runs.values()):
            _kill(run.process)
        if self._runs:
            self._on_training(False)  # serving gets its cores back for whatever it still has to do

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # one bad job must not end job processing for all
                log.exception("fine-tuning job loop")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _tick(self) -> None:
        for run in list(self._runs.values()):
            self._watch(run)
        with self._lock:
            pending = list(self._pending)
        for job_id in pending:
            job = self.jobs.get(job_id)
            if job["status"] == "validating_files" and not self._stop.is_set():
                self._check_files(job)
        for job_id in pending:
            if len(self._runs) >= self.max_running or self._stop.is_set():
                break
            job = self.jobs.get(job_id)
            if job["status"] == "queued":
                self._launch(job)

    def _check_files(self, job: dict) -> None:
        self.jobs.add_event(job["id"], "Validating training file: " + job["training_file"])
        try:
            validated = self._validate(job)
        except JobError as exc:
            with self._lock:
                if self.jobs.get(job["id"])["status"] == "validating_files":
                    self._finish(job["id"], "failed", {"code": exc.code, "message": str(exc), "param": exc.param})
            return
        with self._lock:
            if self.jobs.get(job["id"])["status"] != "validating_files":
                return  # cancelled meanwhile
            # no routing examples given: the expert is routed by prompts like those it was trained on
            derived = {} if job.get("_examples_for_router") or not validated.prompts else {
                "_examples_for_router": list(validated.prompts), "_examples_from_training_file": True}
            self.jobs.update(job["id"], status="queued", _examples=validated.examples, _tokens=validated.tokens,
                             **derived)
        self.jobs.add_event(job["id"], f"Files validated: {validated.examples} conversations, "
                                       f"{validated.tokens} tokens; the job is queued")
        if derived:
            self.jobs.add_event(job["id"], f"No routing examples given: {len(validated.prompts)} prompts of the "
                                           "training file route to the expert")

    def _launch(self, job: dict) -> None:
        folder = self.jobs.folder(job["id"])
        plan = self._plan(job)
        (folder / "plan.json").write_text(json.dumps(plan))
        (folder / "error.txt").unlink(missing_ok=True)
        progress = folder / "progress.jsonl"
        root = str(Path(__file__).resolve().parents[2])  # where `server` is, installed or not
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAPLEX_JOB_PARENT": str(os.getpid()), "OMP_NUM_THREADS": str(plan.get("threads", 1)),
               "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with self._lock:  # a cancel between our read and here must win: look again, under the lock
            if self.jobs.get(job["id"])["status"] != "queued":
                return
            if not self._runs:
                self._on_training(True)  # serving gives up the cores the run will use, before it starts
            self._pending.remove(job["id"])
            with open(folder / "worker.log", "ab") as log_file:
                # its own session: cancelling kills the worker and anything it started, and a Ctrl-C meant
                # for the server does not reach it (the server stops it; the job resumes at the next start)
                process = subprocess.Popen([sys.executable, "-m", "server.jobs.worker", str(folder)],
                                           stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            offset = progress.stat().st_size if progress.exists() else 0
            self._runs[job["id"]] = _Run(job["id"], process, offset)
            self.jobs.update(job["id"], status="running")
        resumed = " (resuming from its last checkpoint)" if job.get("_resume") else ""
        self.jobs.add_event(job["id"], f"Fine-tuning job started{resumed}")

    def _watch(self, run: _Run) -> None:
        self._read_progress(run)
        if run.job_id in self._cancel and run.cancel_at is None:
            run.cancel_at = time.monotonic()
            _terminate(run.process)
        if run.cancel_at is not None and time.monotonic() - run.cancel_at > KILL_GRACE_S:
            _kill(run.process)
        code = run.process.poll()
        if code is None:
            return
        try:
            self._ended(run, code)
        except Exception as exc:  # never leave a job "running" that nothing runs: it would hold its place forever
            log.exception("fine-tuning job %s", run.job_id)
            with self._lock:
                if self._runs.pop(run.job_id, None) is not None and not self._runs:
                    self._on_training(False)
                self._finish(run.job_id, "failed", {"code": "internal_error", "param": None, "message":
                             f"the server could not finish the job: {type(exc).__name__}: {exc}"})

    def _ended(self, run: _Run, code: int) -> None:
        """The worker exited with `code`: the job's outcome."""
        self._read_progress(run)
        folder = self.jobs.folder(run.job_id)
        with self._lock:
            del self._runs[run.job_id]
            cancelled = run.job_id in self._cancel
            self._cancel.discard(run.job_id)
            if not self._runs:
                self._on_training(False)
        if cancelled:
            with self._lock:
                self._finish(run.job_id, "cancelled", None)
            return
        if self._stop.is_set():
            return  # killed by the server's own shutdown: still "running", resumed at the next start
        if code != 0:
            error = (folder / "error.txt").read_text() if (folder / "error.txt").exists() else f"the training " \
                f"process exited with code {code} (see {folder / 'worker.log'})"
            kind = "invalid_training_file" if code == USER_ERROR else "training_failed"
            with self._lock:
                self._finish(run.job_id, "failed", {"code": kind, "message": error,
                                                    "param": "training_file" if code == USER_ERROR else None})
            return
        job = self.jobs.get(run.job_id)
        try:
            model = self._register(job, folder / "train")
        except JobError as exc:
            with self._lock:
                self._finish(run.job_id, "failed", {"code": exc.code, "message": str(exc), "param": exc.param})
            return
        self.jobs.add_event(run.job_id, f"New fine-tuned model created: {model}")
        with self._lock:
            self._finish(run.job_id, "succeeded", None, fine_tuned_model=model,
                         trained_tokens=job.get("_tokens", 0) * job["hyperparameters"]["n_epochs"])

    def _read_progress(self, run: _Run) -> None:
        path = self.jobs.folder(run.job_id) / "progress.jsonl"
        if not path.exists():
            return
        with open(path) as handle:
            handle.seek(run.progress_offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next look
        run.progress_offset += len(complete.encode())
        for line in complete.splitlines():
            record = json.loads(line)
            if record["kind"] == "step":
                self.jobs.add_event(run.job_id, f"Step {record['step']}/{record['total_steps']}: training loss="
                                                f"{record['loss']:.4f}, learning rate={record['lr']:.3g}",
                                    data={"step": record["step"], "total_steps": record["total_steps"],
                                          "train_loss": record["loss"], "learning_rate": record["lr"]})
                self.jobs.update(run.job_id, _steps_done=record["step"], _total_steps=record["total_steps"],
                                 _last_loss=record["loss"])
            elif record["kind"] == "checkpoint":
                job = self.jobs.get(run.job_id)
                checkpoints = [*job.get("_checkpoints", []),
                               {"step": record["step"], "created_at": record["time"], "train_loss": job.get("_last_loss"),
                                "valid_loss": record.get("valid_loss")}]
                self.jobs.update(run.job_id, _checkpoints=checkpoints)
                self.jobs.add_event(run.job_id, f"Checkpoint created at step {record['step']}")

    def _finish(self, job_id: str, status: str, error: dict | None, **fields) -> dict:
        """Called with the lock held."""
        if job_id in self._pending:  # cancelled or failed before it started
            self._pending.remove(job_id)
        job = self.jobs.update(job_id, status=status, error=error, finished_at=int(time.time()), **fields)
        message = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
                   "failed": f"The job failed: {error['message'] if error else ''}"}[status]
        self.jobs.add_event(job_id, message, level="error" if status == "failed" else "info")
        return job


def _terminate(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
