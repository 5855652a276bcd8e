"""Fine-tuning as the server sees it: the file store, the job store and the job manager, wired to the
served base (its tokenizer checks files; its folder is what a job trains on)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from server.jobs.checker import FileChecker
from server.jobs.manager import JobError, JobManager, Validated
from server.jobs.store import FileStore, JobStore

MAX_PROBLEMS = 5  # problems listed per file; the rest are counted


@dataclass
class TrainingDefaults:
    """What every job's plan takes from the server (not from the request)."""

    base_model: str
    cache_dir: str | None
    quantization: str
    context_window: int
    threads: int
    checkpoint_every: int


class FineTuning:
    def __init__(self, root: Path, tokenizer, end_of_turn_ids: set[int], defaults: TrainingDefaults,
                 register: Callable[[dict, Path], str], max_running: int = 1,
                 on_training: Callable[[bool], None] = lambda active: None, files: FileStore | None = None):
        self.files = files or FileStore(root / "files")  # the server's one file store (batch files live there too)
        self.store = JobStore(root / "jobs")
        self.defaults = defaults
        self.checker = FileChecker(tokenizer, end_of_turn_ids, defaults.context_window, MAX_PROBLEMS)
        self.manager = JobManager(self.files, self.store, self._validate, self._plan, register, max_running,
                                  on_training)

    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop()
        self.checker.stop()

    # ---- files ---------------------------------------------------------------------------

    def check_file(self, path: Path) -> list[str]:
        """Every problem of an uploaded training file (the first few, by line number); [] if it is good.
        Blocking, in the checker process (server/jobs/checker.py): call it from a thread."""
        return self.checker.scan(path).problems

    # ---- jobs ----------------------------------------------------------------------------

    def submit(self, job: dict) -> dict:
        """Copy the job's files into its folder (a job never depends on files deleted later), then queue it."""
        folder = self.store.folder(job["id"])
        folder.mkdir(parents=True)
        shutil.copyfile(self.files.content_path(job["training_file"]), folder / "training.jsonl")
        if job.get("validation_file"):
            shutil.copyfile(self.files.content_path(job["validation_file"]), folder / "validation.jsonl")
        return self.manager.submit(job)

    def cancel(self, job_id: str) -> dict:
        return self.manager.cancel(job_id)

    def _validate(self, job: dict) -> Validated:
        folder = self.store.folder(job["id"])
        scan = self.checker.scan(folder / "training.jsonl")
        if scan.problems:
            raise JobError("The training file has problems: " + "; ".join(scan.problems))
        if (folder / "validation.jsonl").exists():
            problems = self.checker.scan(folder / "validation.jsonl").problems
            if problems:
                raise JobError("The validation file has problems: " + "; ".join(problems), param="validation_file")
        return Validated(scan.conversations, scan.tokens, scan.prompts)

    @staticmethod
    def expert_of(job: dict) -> dict:
        """The expert a finished job registers: OpenAI's name pattern ft:<base>:<suffix>:<job id>, and the
        fields the job was created with (an ExpertRegistration's)."""
        return {"name": f"ft:{job['model']}:{job.get('user_provided_suffix') or ''}:{job['id']}",
                "description": job["_description"], "examples": job["_examples_for_router"],
                "negative_examples": job["_negative_examples"], "stop": job["_stop"]}

    def _plan(self, job: dict) -> dict:
        """plan.json for the worker: training.train.TrainConfig's fields."""
        folder, hyper, d = self.store.folder(job["id"]), job["hyperparameters"], self.defaults
        validation = folder / "validation.jsonl"
        return {
            "data": str(folder / "training.jsonl"),
            "validation_data": str(validation) if validation.exists() else None,
            "name": job["id"], "out": str(folder / "train"),
            "base_model": d.base_model, "cache_dir": d.cache_dir, "quantization": d.quantization,
            "rank": job["_rank"], "alpha": 2 * job["_rank"], "targets": job["_targets"],
            "epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
            "lr": 1e-3 * hyper["learning_rate_multiplier"], "max_length": d.context_window, "seed": job["seed"],
            "resume": bool(job.get("_resume")), "checkpoint_every": d.checkpoint_every,
            "description": job["_description"], "examples": job["_examples_for_router"], "stop": job["_stop"],
            "threads": d.threads,
        }
