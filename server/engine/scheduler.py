"""Scheduling decisions, apart from the thread that carries them out: who is admitted into the
batch, in which order, and where a finished request's slot goes.

Not thread-safe by itself: the engine calls `admit` under its queue lock and the rest on its own
thread. Nothing here touches the model: the engine does what these decisions say.
"""
from __future__ import annotations

import collections
from typing import Callable

from server.engine.residency import AdapterUnavailable
from server.engine.sequence import Sequence

# A prefill forward holds at most this many prompt tokens: long enough to batch arrivals,
# short enough that running streams are not stalled for long.
PREFILL_TOKEN_BUDGET = 2048


class Scheduler:
    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # request i decodes in KV slot i: slots 0..B-1 stay packed

    def adapters_in_use(self) -> set[str | None]:
        return {seq.adapter_key for seq in (*self.running, *self.waiting)}

    def admit(self, acquire: Callable[[str, set[str]], bool]) -> tuple[list[Sequence], list[tuple[Sequence, str]]]:
        """(requests to prefill now, each given its slot; requests that cannot run, with why).

        In arrival order while there is room and prefill budget; a request whose adapter is still
        loading (acquire returns False) keeps its place; cancelled waiting requests are dropped.
        The admitted batch is ordered by adapter, so the LoRA step finds equal adapters side by side.
        """
        batch: list[Sequence] = []
        failed: list[tuple[Sequence, str]] = []
        tokens = 0
        in_use = {seq.adapter_key for seq in self.running}
        kept: collections.deque[Sequence] = collections.deque()
        while self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled:
                continue
            room = len(self.running) + len(batch) < self.max_batch_size
            if not room or (batch and tokens + len(seq.prompt_ids) > PREFILL_TOKEN_BUDGET):
                kept.append(seq)
                continue
            try:
                ready = seq.adapter_key is None or acquire(seq.adapter_key, in_use | {seq.adapter_key})
            except AdapterUnavailable as exc:
                failed.append((seq, str(exc)))
                continue
            if not ready:
                kept.append(seq)
                continue
            in_use.add(seq.adapter_key)
            batch.append(seq)
            tokens += len(seq.prompt_ids)
        self.waiting = kept
        batch.sort(key=lambda seq: (seq.adapter_key is None, seq.adapter_key or ""))
        for seq in batch:
            seq.slot = len(self.running)
            self.running.append(seq)
        return batch, failed

    def release(self, seq: Sequence) -> Sequence | None:
        """Take seq out of the batch. Returns the request moved into its slot (from the last slot), if any:
        its KV cache must follow it."""
        slot = seq.slot
        seq.slot = -1
        last = self.running.pop()
        if last is seq:
            return None
        last.slot = slot
        self.running[slot] = last
        return last

    def cancelled(self) -> list[Sequence]:
        """Running requests whose client went away (waiting ones are dropped by admit)."""
        return [seq for seq in self.running if seq.cancelled]

    def drain(self) -> list[Sequence]:
        """Every request, running or waiting, taken out at once (the engine is stopping)."""
        pending = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        for seq in pending:
            seq.slot = -1
        return pending
