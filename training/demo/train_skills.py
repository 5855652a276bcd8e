"""Train the skill experts the way a user would: through the server's own fine-tuning API.

    python -m training.demo.train_skills [--skills arithmetic units ...] [--count N] [--epochs 1]

For each skill (training/demo/skills.py) it writes training/demo/<skill>/train.jsonl from the
generator's training phrasings, then starts `loraplex serve` on the default base with a private
data folder and an admin key and, with the unmodified openai client, uploads every file
(`files.create`), creates one job per skill (`fine_tuning.jobs.create`, with the skill's description
and no routing examples: the server takes them from the training prompts), and waits for them (they
run one at a time, in the server's worker process). Each finished job's adapter folder (weights,
adapter_config.json, expert.json, training.json) is copied to training/demo/<skill>/adapter, where
configs/default.yaml serves it; its training.json records the job's wall time (from running to done).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.demo.skills import DESCRIPTIONS, SKILLS, generate

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Conversations per skill, one pass each: sized for a 2-core CPU shared with other work (a step of 8
# extract conversations is 10 CPU-seconds; the loss is under 0.01 by step 10); the regular forms (JSON,
# SQL) need fewer than the ones that compute (sums, weekdays).
COUNTS = {"extract": 160, "sql": 200, "units": 320, "weekday": 800, "arithmetic": 400}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "expert.json", "training.json")


def write_training_file(skill: str, count: int, seed: int = 0) -> Path:
    folder = HERE / skill
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    with open(path, "w") as handle:
        for item in generate(skill, "train", count, seed):
            handle.write(json.dumps({"messages": [{"role": "user", "content": item.prompt},
                                                  {"role": "assistant", "content": item.answer}]}) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """`loraplex serve` on the default base, no experts, fine-tuning on; returns (process, base URL)."""
    port = _free_port()
    config = data_dir / "server.yaml"
    config.write_text(json.dumps({"adapters": {}, "router": "none", "ui": False, "fine_tune_threads": threads,
                                  "fine_tune_checkpoint_every": 10, "max_batch_size": 2}))
    env = {**os.environ, "LORAPLEX_DATA_DIR": str(data_dir / "data"), "LORAPLEX_ADMIN_KEY": "train-skills"}
    log = open(data_dir / "server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "server.startup.cli", "serve", "--port", str(port),
                                "--config", str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {data_dir / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("the server did not become ready in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", nargs="+", default=list(SKILLS), choices=SKILLS)
    parser.add_argument("--count", type=int, help=f"training conversations per skill (default {COUNTS})")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr-multiplier", type=float, default=2.0, help="x 1e-3")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training worker")
    parser.add_argument("--keep", help="keep the server's data folder here (default: a temporary one)")
    args = parser.parse_args()
    from openai import OpenAI

    counts = {skill: args.count or COUNTS[skill] for skill in args.skills}
    files = {skill: write_training_file(skill, counts[skill]) for skill in args.skills}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="train-skills-"))
    work.mkdir(parents=True, exist_ok=True)
    process, url = start_server(work, args.threads)
    # a SIGTERM (or a Ctrl-C) stops the server, and with it the training worker, on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        client = OpenAI(base_url=url + "/v1", api_key="train-skills", max_retries=2, timeout=600)
        base = client.models.list().data[0].id
        jobs = {}
        for skill, path in files.items():
            with open(path, "rb") as handle:
                upload = client.files.create(file=(path.name, handle), purpose="fine-tune")
            jobs[skill] = client.fine_tuning.jobs.create(
                model=base, training_file=upload.id, suffix=skill, seed=0,
                hyperparameters={"n_epochs": args.epochs, "batch_size": 8,
                                 "learning_rate_multiplier": args.lr_multiplier},
                extra_body={"rank": args.rank, "description": DESCRIPTIONS[skill]}).id
            print(f"{skill}: {upload.id} -> {jobs[skill]}", flush=True)
        started, wall, last = {}, {}, {}
        while len(wall) < len(jobs):
            for skill, job_id in jobs.items():
                if skill in wall:
                    continue
                job = client.fine_tuning.jobs.retrieve(job_id)
                if job.status == "running" and skill not in started:
                    started[skill] = time.monotonic()
                extra = job.model_extra.get("loraplex", {})
                progress = (extra.get("steps_done"), extra.get("total_steps"))
                if progress != last.get(skill) and job.status == "running":
                    last[skill] = progress
                    if (progress[0] or 0) % 25 == 0:
                        print(f"{skill}: step {progress[0]}/{progress[1]}", flush=True)
                if job.status in ("succeeded", "failed", "cancelled"):
                    wall[skill] = time.monotonic() - started.get(skill, time.monotonic())
                    if job.status != "succeeded":
                        raise RuntimeError(f"{skill}: job {job.status}: {job.error}")
                    copy_adapter(work / "data" / "fine_tuning" / "jobs" / job_id / "train", HERE / skill / "adapter",
                                 skill, {"wall_s": round(wall[skill]), "threads": args.threads, "job": job_id,
                                         "epochs": args.epochs, "trained_tokens": job.trained_tokens,
                                         "command": "python -m training.demo.train_skills " + " ".join(sys.argv[1:])})
                    print(f"{skill}: done in {wall[skill]:.0f} s -> {job.fine_tuned_model}", flush=True)
            time.sleep(5)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def copy_adapter(source: Path, target: Path, name: str, record: dict) -> None:
    """The job's adapter folder, as the default config serves it; expert.json named for the skill, and
    training.json with how the job ran (`record`: wall time, threads) for the README."""
    target.mkdir(parents=True, exist_ok=True)
    for file in ADAPTER_FILES:
        shutil.copyfile(source / file, target / file)
    meta = json.loads((target / "expert.json").read_text())
    (target / "expert.json").write_text(json.dumps({**meta, "name": name}, indent=2) + "\n")
    training = json.loads((target / "training.json").read_text())
    training.update(base_model="embedded:smollm2", **record)  # not the trainer's cache path
    (target / "training.json").write_text(json.dumps(training, indent=2) + "\n")


if __name__ == "__main__":
    main()
