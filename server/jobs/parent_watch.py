"""A helper process never outlives the server that started it.

A server killed before it could stop its helpers (SIGKILL, the OOM killer) would leave them running: a
fine-tuning worker training on (and the restarted server starting a second one on the same job folder),
a training-file checker waiting for work forever. Each helper watches its parent from a daemon thread and
exits when it has been reparented. Polling getppid() is portable and needs no help from the parent, unlike
PR_SET_PDEATHSIG, which fires when the *thread* that started the child ends.
"""
from __future__ import annotations

import os
import threading
import time


def _exit_with_parent(parent: int, interval_s: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(interval_s)


def watch_parent(parent: int | None = None, interval_s: float = 1.0) -> None:
    """Exit this process (at once, no cleanup: the parent that would want it is gone) within `interval_s`
    of its parent's death. `parent`: the pid to watch, by default this process's parent now."""
    parent = os.getppid() if parent is None else parent
    threading.Thread(target=_exit_with_parent, args=(parent, interval_s), name="parent-watch", daemon=True).start()
