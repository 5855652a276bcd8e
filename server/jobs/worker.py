"""One fine-tuning run, in its own process: `python -m server.jobs.worker <job folder>`.

Why a process: training holds the GIL and every core torch gives it; in the server's process it
would stall the event loop and the engine thread. Here it runs at lower priority with a bounded
number of threads (`plan.json`'s `threads`), and cancelling is killing it: the last checkpoint was
renamed into place whole, so a killed run resumes from it (training/train.py).

It reads `plan.json` (TrainConfig's fields) from the job folder, appends progress to
`progress.jsonl` (one JSON object a line: steps with loss and learning rate, checkpoints), and
exits 0 when the adapter is saved, 3 with `error.txt` when the data or the plan is wrong (the
user's to fix), 1 on anything else.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from server.jobs.parent_watch import watch_parent

USER_ERROR = 3


def _emit(folder: Path, record: dict) -> None:
    with open(folder / "progress.jsonl", "a") as handle:
        handle.write(json.dumps({**record, "time": int(time.time())}) + "\n")
        handle.flush()


def _gpu_shortfall(config) -> str | None:
    """On CUDA: a message when free device memory is clearly too small for this run (weights at their
    quantized size, the LoRA optimizer state and 2 GiB for activations), checked before loading anything."""
    import torch

    if not torch.cuda.is_available():
        return None
    from models.base_model import resolve_base_folder

    folder, _ = resolve_base_folder(config.base_model, config.cache_dir)
    weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    share = {"nf4": 0.3, "int4": 0.3, "auto": 0.3, "int8": 0.55}.get(config.quantization, 1.0)  # of 16-bit weights on disk
    need = int(weights * share) + 2 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        return (f"not enough free GPU memory to train: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB "
                "needed; the job can be retried when serving uses less (smaller kv_cache_memory)")
    return None


def _hold_job_lock(folder: Path):
    """One worker per job folder, whatever happened before: wait for a previous one to be gone."""
    import fcntl

    handle = open(folder / "worker.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    parent = os.environ.get("LORAPLEX_JOB_PARENT")
    if parent:  # the job stays "running" and resumes at the next start (server/jobs/parent_watch.py)
        watch_parent(int(parent))
    lock = _hold_job_lock(folder)  # noqa: F841 (held until the process ends)
    plan = json.loads((folder / "plan.json").read_text())
    threads = int(plan.pop("threads", 1))
    try:
        os.nice(int(plan.pop("nice", 10)))  # serving keeps the CPU when both want it
    except OSError:
        pass
    import torch

    torch.set_num_threads(threads)
    from training.chat_data import DataError
    from training.train import TrainConfig, train

    config = TrainConfig(**{**plan, "targets": tuple(plan["targets"]), "progress": False})
    shortfall = _gpu_shortfall(config)
    if shortfall:
        (folder / "error.txt").write_text(shortfall)
        return 1
    try:
        train(config, on_step=lambda step, total, loss, lr: _emit(
                  folder, {"kind": "step", "step": step, "total_steps": total, "loss": loss, "lr": lr}),
              on_checkpoint=lambda step, valid_loss: _emit(
                  folder, {"kind": "checkpoint", "step": step, "valid_loss": valid_loss}))
    except DataError as exc:
        (folder / "error.txt").write_text(str(exc))
        return USER_ERROR
    except Exception as exc:  # the message goes to the job; the trace to worker.log
        traceback.print_exc()
        (folder / "error.txt").write_text(f"training failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
