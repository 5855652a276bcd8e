"""Training files are checked in a process of their own, at the lowest CPU priority.

Checking a file renders every conversation through the base's chat template (Jinja, pure Python) and
tokenizes it: a minute or more for a file of tens of megabytes. Done in a thread of the server, that
work holds the GIL for milliseconds at a time, and the engine thread, which needs the GIL between
every tensor operation of a decode step, would wait behind it: streams stall while a file is checked.
A separate process has its own interpreter, and at nice 19 it gets the cores the engine leaves idle.

The process is started on first use and stopped after `idle_s` without work, so a server that never
sees an upload never pays for it. The file is read from disk by the process itself: nothing but its
path and the tokenizer crosses over, and only counts and problem messages come back.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from server.jobs.parent_watch import watch_parent
from training.chat_data import first_user_prompts, jsonl_lines, scan_chat_lines

ROUTER_EXAMPLES = 24  # training prompts kept as a job's routing examples when it gives none


@dataclass(frozen=True)
class FileScan:
    conversations: int
    tokens: int  # of all conversations, one epoch
    problems: list[str]  # the first few, each naming its line; [] when the file is good
    prompts: tuple[str, ...] = ()  # up to ROUTER_EXAMPLES first user messages, spread through the file


def scan_file(path: str, tokenizer, end_of_turn_ids: set[int], max_length: int, max_problems: int) -> FileScan:
    """The check itself (in the checker process, or inline for callers that are themselves off the server)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return FileScan(0, 0, [f"the file is not UTF-8 text (byte {exc.start})"])
    lines = jsonl_lines(text)
    examples, problems = scan_chat_lines(lines, tokenizer, end_of_turn_ids, max_length, max_problems)
    prompts = () if problems else tuple(first_user_prompts(lines, ROUTER_EXAMPLES))
    return FileScan(len(examples), sum(len(e.input_ids) for e in examples), problems, prompts)


def _checker_process() -> None:
    """The checker runs at the lowest priority, and ends with the server (server/jobs/parent_watch.py)."""
    os.nice(19)
    watch_parent()


class FileChecker:
    """scan(path) in the checker process; one file at a time (the process has one worker)."""

    def __init__(self, tokenizer, end_of_turn_ids: set[int], max_length: int, max_problems: int,
                 idle_s: float = 60.0):
        self._args = (tokenizer, set(end_of_turn_ids), max_length, max_problems)
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = 0
        self._last_used = time.monotonic()
        self._reaper: threading.Timer | None = None

    def scan(self, path: str | Path) -> FileScan:
        """Blocking: call it from a thread. A checker process that died (killed, out of memory) is
        replaced on the next call; this call raises."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_checker_process)
            pool = self._pool
            self._busy += 1
        try:
            return pool.submit(scan_file, str(path), *self._args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            raise
        finally:
            with self._lock:
                self._busy -= 1
                self._last_used = time.monotonic()
                self._schedule_reap()

    def _schedule_reap(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Timer(self._idle_s, self._reap)
            self._reaper.daemon = True
            self._reaper.start()

    def _reap(self) -> None:
        with self._lock:
            self._reaper = None
            idle = time.monotonic() - self._last_used
            if self._pool is None or self._busy:
                return
            if idle < self._idle_s:
                self._schedule_reap()
                return
            pool, self._pool = self._pool, None
        pool.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._pool is not None

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            if self._reaper is not None:
                self._reaper.cancel()
                self._reaper = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
