"""Scheduling decisions, apart from the thread that carries them out: which requests run in the
next engine step, with how many of their tokens, and who gives up KV blocks when they run out.

One step mixes decode rows (one token each) and prefill chunks under a token budget (`max_step_tokens`, and
while streams decode, what step_cost.py says keeps their steps short), so a long prompt is prefilled a chunk
per step while running streams keep getting a token every step (chunked prefill). Requests are admitted in
order of `priority` (vLLM's: lower runs first; 0 by default, batch lines run at a higher number), and within
one priority in arrival order or, with several tenants waiting, in turns over the tenants (fewest rows in the
batch first, each tenant's own requests in their order), when a batch row and KV blocks for their whole prompt
are free; and while several tenants have requests waiting, only those of the tenants with the fewest rows join
a step (running requests are never held). Priority always comes first: a tenant's turn never lets a
lower-priority request pass a higher one, and turns only reorder requests of equal priority, so one tenant's
flood of arrivals cannot hold every batch row, or share every new request's prefill step, while another's
request of the same priority waits behind it. When a running request needs a new block and none is free, the
running request that comes last in priority order (the lowest priority, then the newest) is preempted: its
blocks are freed and it goes back to the head of its priority in the queue, to be computed again (cheaply,
from the prefix cache when its blocks survived). A waiting request that finds every row (or the blocks it
needs) taken by requests of a lower priority preempts them in the same step, so low-priority work fills the
rows interactive requests leave free and never holds one up for a row. While requests of the best priority
decode, lower-priority ones also get only the step time they can spare (step_cost.py's Slack): a row it does
not pay for keeps its blocks and waits a step. A step's decode rows run grouped by adapter (the LoRA step then
needs no gather when the adapters have as many rows each); a row's result never depends on its place.

Not thread-safe by itself: the engine calls `schedule` under its queue lock and the rest on its
own thread. Nothing here touches the model: the engine does what these decisions say.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

from server.engine.block_manager import BlockManager
from server.engine.residency import AdapterUnavailable
from server.engine.sequence import Sequence
from server.engine.step_cost import Slack


@dataclass
class Step:
    """What one forward pass computes: (request, how many of its uncomputed tokens) in row order."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # joined the batch this step (first time or again)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str, str]] = field(default_factory=list)  # cannot run: why, and the kind
    decode_rows: int = 0  # the first rows of `work`: one token each, for requests past their prompt
    # when lower-priority work was sized against a slack: (best-priority decode rows, best-priority prompt
    # tokens, lower-priority decode rows, lower-priority prompt tokens), for the cost model to check its price
    background: tuple[int, int, int, int] | None = None


class Scheduler:
    def __init__(self, max_batch_size: int, max_step_tokens: int, blocks: BlockManager | None = None):
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.blocks = blocks  # set by the engine once the model (hence the pool size) is loaded
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest

    def adapters_in_use(self) -> set[str]:
        return {key for seq in (*self.running, *self.waiting) for key in seq.adapter_keys}

    def schedule(self, acquire: Callable[[str, set[str]], bool],
                 prompt_budget: Callable[[int], int] | None = None,
                 background: Callable[[int], Slack | None] | None = None) -> Step:
        """Plan the next step. `acquire(adapter, in_use)` says whether an adapter is on the device
        (False: still loading; the request keeps its place; AdapterUnavailable: it cannot run).
        `prompt_budget(decode rows)`: prompt tokens the step may add to its decode rows (default:
        what max_step_tokens leaves). `background(best-priority decode rows)`: what lower-priority
        requests may add to the step (step_cost.Slack; None: no limit); a lower-priority request that does
        not fit keeps its row and KV blocks and waits a step (paused, not preempted)."""
        step = Step()
        # 0. a waiting request takes the row of a running one it outranks (vLLM's priority preemption)
        self._make_room(step)
        best = min((seq.priority for seq in self.running), default=0)
        foreground = sum(1 for seq in self.running if seq.priority == best and seq.uncomputed == 1)
        # best-priority rows decode beside lower-priority work running, or waiting to join (its first prompt is
        # paid for too; `waiting` is in priority order, so its last request is the lowest)
        lower = foreground and (foreground < len(self.running) or (self.waiting and self.waiting[-1].priority > best))
        slack = background(foreground) if background is not None and lower else None
        # 1. every running request that has its prompt computed decodes one token (lower-priority ones
        # while the slack pays for their row)
        for seq in list(self.running):
            if not seq.running or seq.uncomputed != 1:
                continue
            if slack is not None and seq.priority > best and not slack.take_row():
                continue  # paused this step: its row and blocks are kept
            while not self.blocks.append_slot(seq):
                victim = self._last_in_line()
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.running:
                step.work.append((seq, 1))
        # decode rows grouped by adapter, in name order (mixtures last): when the adapters have as many rows
        # each, the LoRA step then needs no gather or scatter (lora_batch.LoraBank.prepare, whose fresh
        # step stack is in name order too); a row's result does not depend on its place in the batch
        step.work.sort(key=lambda item: (bool(item[0].adapter_mix), item[0].adapter_key or ""))
        decode_rows = step.decode_rows = len(step.work)
        budget = prompt_budget(decode_rows) if prompt_budget else self.max_step_tokens - decode_rows
        # prefill always progresses, even when the decode rows alone fill the budget
        budget = max(budget, self.blocks.block_size)
        # 2. requests part-way through their prompt continue, oldest first
        for seq in self.running:
            if budget <= 0:
                break
            if seq.uncomputed > 1:
                count = self._prompt_chunk(seq, budget, best, slack)
                if count:
                    step.work.append((seq, count))
                    budget -= count
        # 3. new arrivals, by priority then in turns over tenants within one priority (_fair_order), while a
        # row, the budget and KV blocks allow
        turn = None
        if self.waiting and any(seq.tenant != self.waiting[0].tenant for seq in self.waiting):
            self.waiting, turn = self._fair_order()
        in_use = {key for seq in self.running for key in seq.adapter_keys}
        kept: collections.deque[Sequence] = collections.deque()
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            if seq.cancelled:
                continue
            if slack is not None and seq.priority > best and slack.tokens() < self.blocks.block_size:
                self.waiting.appendleft(seq)  # lower-priority work joins when the slack pays for its prompt
                break
            if turn is not None and not turn(seq):
                kept.append(seq)  # keeps its place: its tenant's turn comes once the others' requests are in
                continue
            try:
                needed = in_use | set(seq.adapter_keys)  # a mixture needs all of its adapters at once
                ready = all([acquire(key, needed) for key in seq.adapter_keys])  # a list: every load starts
            except AdapterUnavailable as exc:
                step.failed.append((seq, str(exc), "adapter"))
                continue
            if not ready:
                kept.append(seq)
                continue
            # a request preempted this step goes first when blocks free up: nobody of its priority or lower
            # overtakes it (a higher priority may: it is ahead in line anyway)
            overtakes = any(other.priority <= seq.priority for other in step.preempted)
            if overtakes or not self._allocate(seq, step):
                if not self.running and not step.preempted:  # the whole pool is free and still too small
                    step.failed.append((seq, f"request needs {len(seq.tokens)} tokens of KV cache; the pool holds "
                                             f"{self.blocks.capacity_tokens}", "fault"))
                    continue
                self.waiting.appendleft(seq)  # first in line when blocks free up: no overtaking
                break
            if not seq.admitted:
                seq.cached_tokens = seq.num_computed
            seq.running = True
            self.running.append(seq)
            in_use.update(seq.adapter_keys)
            step.admitted.append(seq)
            count = self._prompt_chunk(seq, budget, best, slack)
            if count:
                step.work.append((seq, count))
                budget -= count
        self.waiting.extendleft(reversed(kept))
        if slack is not None:
            split = [0, 0, 0, 0]
            for index, (seq, count) in enumerate(step.work):
                split[(2 if seq.priority > best else 0) + (index >= step.decode_rows)] += count
            step.background = tuple(split)
        return step

    def _prompt_chunk(self, seq: Sequence, budget: int, best: int, slack: Slack | None) -> int:
        """Prompt tokens seq computes in this step: a chunk within the budget, and for lower-priority work
        within what the slack still pays for (charged to it)."""
        if slack is None or seq.priority <= best:
            return self._chunk(seq, budget)
        count = self._chunk(seq, min(budget, slack.tokens()))
        slack.take_tokens(count)
        return count

    def _fair_order(self) -> tuple[collections.deque[Sequence], Callable[[Sequence], bool]]:
        """The waiting requests by priority first (lower number first, as `add` keeps them), then within one
        priority in turns over their tenants: the tenant with the fewest running rows first (then the one
        whose request has waited longest), one request each per turn, each tenant's in order. Turns never
        move a request across priorities, so a tenant cannot jump a higher-priority request by taking
        its turn, and priority cannot be used to skip another tenant's turn except by a lower number.

        And whose requests may join this step: within one priority, only the tenants with the fewest running
        rows among those waiting. A new prompt is the expensive part of a step on a small device (each token
        costs about what a decode row does), so a tenant whose request arrives beside another's would
        otherwise share its prefill step with them and wait about twice as long for its first token; the
        tenant with more rows waits one step for its next request. Only admission is held, never a running
        request (a prompt part-way through keeps going): a held request holds no row and no KV block, so
        holding it can never keep the others from running."""
        rows = collections.Counter(seq.tenant for seq in self.running)
        levels: dict[int, dict[str, list[Sequence]]] = {}
        for seq in self.waiting:
            levels.setdefault(seq.priority, {}).setdefault(seq.tenant, []).append(seq)
        order: collections.deque[Sequence] = collections.deque()
        allowed: dict[int, set[str]] = {}
        for priority in sorted(levels):
            queues = levels[priority]
            tenants = sorted(queues, key=lambda t: rows[t])  # stable: ties keep the order of their first request
            for turn in range(max(len(q) for q in queues.values())):
                order.extend(queues[t][turn] for t in tenants if turn < len(queues[t]))
            # a tenant whose waiting requests were all cancelled has none to take its turn
            waiting = [t for t in tenants if not all(seq.cancelled for seq in queues[t])]
            allowed[priority] = {t for t in waiting if rows[t] == rows[waiting[0]]} if waiting else set()
        return order, lambda seq: seq.tenant in allowed[seq.priority]

    def add(self, seq: Sequence) -> None:
        """Queue an arrival: behind every waiting request of its priority or a higher one (lower number)."""
        waiting = self.waiting
        if not waiting or waiting[-1].priority <= seq.priority:
            waiting.append(seq)  # the common case: one priority
            return
        index = next(i for i, other in enumerate(waiting) if other.priority > seq.priority)
        waiting.insert(index, seq)

    def _requeue(self, seq: Sequence) -> None:
        """Put a preempted request back at the head of its priority in the queue."""
        index = next((i for i, other in enumerate(self.waiting) if other.priority >= seq.priority), len(self.waiting))
        self.waiting.insert(index, seq)

    def _last_in_line(self) -> Sequence:
        """The running request to give up its blocks first: the lowest priority, the newest within it."""
        worst = self.running[-1]
        for seq in reversed(self.running):
            if seq.priority > worst.priority:
                worst = seq
        return worst

    def _outranked(self, seq: Sequence) -> Sequence | None:
        """The running request seq may preempt (the last in line, when seq's priority is higher); else None."""
        if not self.running:
            return None
        victim = self._last_in_line()
        return victim if victim.priority > seq.priority else None

    def _make_room(self, step: Step) -> None:
        """Free rows for waiting requests that outrank running ones, best first: while every row is taken,
        the lowest-priority running request goes back to the queue (its blocks with it). Blocks are won
        the same way at admission (_allocate)."""
        if not self.waiting or not self.running or len(self.running) < self.max_batch_size:
            return
        candidates = [seq for seq in self.waiting if not seq.cancelled][:self.max_batch_size]
        rows = self.max_batch_size - len(self.running)
        for seq in candidates:
            if rows > 0:  # a free row is this one's
                rows -= 1
                continue
            victim = self._outranked(seq)
            if victim is None:
                break
            self._preempt(victim, step)

    def _allocate(self, seq: Sequence, step: Step) -> bool:
        """KV blocks for seq's prompt, taken from lower-priority running requests if the pool is short."""
        while not self.blocks.allocate(seq):
            victim = self._outranked(seq)
            if victim is None:
                return False
            self._preempt(victim, step)
        return True

    def release(self, seq: Sequence) -> None:
        """Take seq out of the batch and give its blocks back."""
        if seq.running:
            seq.running = False
            self.running.remove(seq)
            self.blocks.free(seq)

    def cancelled(self) -> list[Sequence]:
        """Running requests whose client went away (waiting ones are dropped by schedule)."""
        return [seq for seq in self.running if seq.cancelled]

    def drain(self) -> list[Sequence]:
        """Every request, running or waiting, taken out at once (the engine is stopping)."""
        pending = [*self.running, *self.waiting]
        for seq in list(self.running):
            self.release(seq)
        self.waiting.clear()
        return pending

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq's prompt to compute now: all that is left if the budget allows, else up to a
        block boundary (the runner computes prompt tokens in block-aligned pieces, so where a chunk
        ends never changes their numbers; model_runner._attention_plan)."""
        if seq.uncomputed <= budget:
            return seq.uncomputed
        size = self.blocks.block_size
        end = (seq.num_computed + budget) // size * size
        return max(end - seq.num_computed, 0)

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.release(seq)
        seq.preemptions += 1
        self._requeue(seq)
        step.preempted.append(seq)
        # a victim already planned into this step (priority preemption can pick any row) leaves it
        for index, (other, _) in enumerate(step.work):
            if other is seq:
                del step.work[index]
                if index < step.decode_rows:
                    step.decode_rows -= 1
                break
        if seq in step.admitted:
            step.admitted.remove(seq)
