"""The engine thread: the only code that touches the model.

Iteration-level (continuous) batching: before every step the engine drops cancelled requests
and runs other engine-thread work (adapter loads); each step is one forward pass over what the
scheduler planned: a token for every running request plus chunks of prompts being prefilled, so
arrivals join the batch at once and long prompts do not stall running streams. A finished request
leaves the batch immediately and its KV blocks go back to the pool (scheduler.py and
block_manager.py decide; this file does).

Its public face is small: submit / cancel a request, register / retire an adapter, where an
adapter resides, the device. Nothing outside reaches the runner or the adapter cache.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from server.engine.detokenizer import OutputText
from server.engine.loops import (NUDGE_SPAN, TEXT_MAX_PERIOD, TEXT_REPEATS, TWICE_CHARS, LoopWatch, digit_widths,
                                 steer_off, text_words)
from server.engine.interface import EngineHandle
from server.engine.block_manager import BlockManager
from server.engine.constraint import FormatDeadEnd
from server.engine.model_runner import ModelRunner, StepItem
from server.engine.residency import AdapterCache, AdapterUnavailable
from server.engine.sampling import TokenLogprob, new_token_counts, sample_batch
from server.engine.scheduler import Scheduler, Step
from server.engine.sequence import EngineOutput, Sequence
from server.engine.step_cost import StepCost
from server.metrics import Metrics

log = logging.getLogger("loraplex.engine")


def record_token_time(seq: Sequence, metrics: Metrics) -> float:
    """A request's clocks at a new token: time to first token, else the gap since its last one. Shared
    with the Ray Serve ingress, which measures the same clocks from the other side of the hop."""
    now = time.monotonic()
    if seq.first_token_time is None:
        seq.first_token_time = now
        metrics.ttft.labels(metrics.label(seq.model)).observe(now - seq.arrival_time)
    else:
        metrics.inter_token.labels(metrics.label(seq.model)).observe(now - seq.last_token_time)
    seq.last_token_time = now
    return now


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits, handed whole (the server builds it from its settings)."""

    max_batch_size: int = 16  # requests in the batch at once
    max_queued: int = 256  # waiting requests past which submit refuses
    max_step_tokens: int = 512  # tokens per forward pass: decode rows plus prefill chunks
    max_step_slowdown: float = 2.0  # while streams decode, a prompt chunk keeps a step under this x a decode step
    background_slowdown: float = 1.1  # lower-priority work keeps best-priority steps under this x their own
    prefix_caching: bool = True
    max_queued_per_tenant: int | None = None  # one tenant's waiting requests past which submit refuses it


class Engine(EngineHandle):
    """The model in this process: one thread owns it and runs the steps (interface.py is its face)."""

    def __init__(self, load_runner: Callable[[], tuple[ModelRunner, AdapterCache]], config: EngineConfig,
                 metrics: Metrics):
        self._load_runner = load_runner
        self.config = config
        self.metrics = metrics
        self.max_queued = config.max_queued
        self._runner: ModelRunner | None = None
        self._adapters: AdapterCache | None = None
        self._blocks: BlockManager | None = None
        self._digits: dict[int, int] = {}  # digit tokens' widths, for constrained answers' digit runs (loops.py)
        self._digit_ids: torch.Tensor | None = None  # the same tokens, ruled out at once when a run is too long
        self._text_keys: list[int] = []  # tokens as words, what free text's loops are compared by (loops.py)
        self._text_widths: list[int] = []  # ... and each word's length in characters
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._on_fatal: Callable[[BaseException], None] | None = None
        self._scheduler = Scheduler(config.max_batch_size, config.max_step_tokens)
        self._step_cost = StepCost(config.max_step_tokens, config.max_step_slowdown, config.background_slowdown)
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-grammar")
        self._tasks: collections.deque[tuple[Callable[[ModelRunner], object], Future]] = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._stalled = False  # requests wait only for adapter loads: sleep until one is done
        self._thread = threading.Thread(target=self._main, name="loraplex-engine", daemon=True)

    # ---- called from other threads ------------------------------------------------------

    def start(self, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self._on_fatal = on_fatal
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        """Queue a request (the caller has checked it fits the context window)."""
        with self._wakeup:
            if self._stopping:
                raise EngineStopped()
            waiting = self._scheduler.waiting
            if len(waiting) >= self.max_queued:
                raise QueueFull()
            share = self.config.max_queued_per_tenant
            # a tenant's flood takes at most its share of the queue: the rest stays open to other tenants
            if seq.tenant and share is not None and sum(1 for other in waiting if other.tenant == seq.tenant) >= share:
                raise QueueFull()
            self._scheduler.add(seq)  # in priority order
            self._wakeup.notify()

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def cancel(self, seq: Sequence) -> None:
        # A plain flag: the engine thread reaps it before its next step.
        seq.cancelled = True
        with self._wakeup:
            self._wakeup.notify()

    def call(self, fn: Callable[[ModelRunner], object]) -> Future:
        """Run fn(runner) on the engine thread between two steps (e.g. load an adapter)."""
        future: Future = Future()
        with self._wakeup:
            if self._stopping:
                future.set_exception(EngineStopped())
                return future
            self._tasks.append((fn, future))
            self._wakeup.notify()
        return future

    def set_threads(self, count: int) -> Future:
        """The engine thread's intra-op CPU threads (OpenMP keeps the count per calling thread, so the change
        runs on the engine thread). Lowered while a training process has cores: more threads than free cores
        make every small op of a decode step wait at OpenMP barriers for a descheduled thread, which slows
        decoding by orders of magnitude, far more than giving up the core does."""
        return self.call(lambda _: torch.set_num_threads(count))

    def register_adapter(self, key: str, folder: str, weights=None) -> Future:
        """Make an adapter servable under `key` (weights already read and checked, or read from folder on use)."""
        return self.call(lambda _: self._adapters.register(key, folder, weights))

    def retire_adapter(self, key: str) -> Future:
        """No new request will use it; its memory is freed once running ones are done."""
        return self.call(lambda _: self._adapters.retire(key))

    def adapters_in_use(self) -> set[str]:
        """Keys that requests running or waiting need (a snapshot, safe from any thread). Read under the queue
        lock, which scheduling holds, so a request moving from waiting to running is seen in one of the two;
        a copy that races a finished request leaving the batch is taken again."""
        with self._wakeup:
            for _ in range(5):
                try:
                    return self._scheduler.adapters_in_use()
                except RuntimeError:  # mutated during the copy
                    continue
        raise RuntimeError("the engine's queues kept changing while they were read")

    def adapter_tier(self, key: str) -> str:
        """Where an adapter resides now: device, cpu or disk (a snapshot, safe from any thread)."""
        return self._adapters.tier(key)

    def adapter_counts(self) -> dict[str, int]:
        """Adapters per residency tier (a snapshot)."""
        return self._adapters.counts() if self._adapters is not None else {}

    @property
    def device(self) -> torch.device:
        return self._runner.device

    def adapter_memory(self) -> tuple[int, int]:
        """(bytes of adapter slots in use, bytes of the slot pool) — a snapshot, safe from any thread."""
        return self._runner.lora.memory() if self._runner is not None else (0, 0)

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes by part (metrics.MEMORY_PARTS): a snapshot, safe from any thread (sizes only, no tensor reads)."""
        runner, blocks = self._runner, self._blocks
        if runner is None or blocks is None:
            return {}
        block = runner.kv_cache_bytes // runner.num_blocks
        used, _ = runner.lora.memory()
        return {"weights": runner.weight_bytes, "kv_cache_pool": runner.kv_cache_bytes,
                "kv_cache_used": blocks.num_used * block, "adapter_slots": used,
                "adapter_step_stack": runner.lora.step_stack_bytes}

    def graph_stats(self) -> dict[str, float]:
        """CUDA graph shapes captured and disabled, replays, graph memory (zeros without graphs): a snapshot."""
        graphs = self._runner.graphs if self._runner is not None else None
        return graphs.stats() if graphs is not None else {}

    def kv_usage(self) -> tuple[int, int]:
        """(KV blocks in use, blocks in the pool) — a snapshot, safe from any thread."""
        if self._blocks is None:
            return 0, 0
        return self._blocks.num_used, self._blocks.num_blocks - 1

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes (0 before the model is loaded)."""
        return self._runner.kv_cache_bytes // self._runner.num_blocks if self._runner is not None else 0

    def lora_activity(self) -> tuple[list[str], list[str]]:
        """Names of the experts (not the base) with requests running, and with requests waiting: a snapshot
        for the adapter-affinity metric gateways read. Copied from another thread: a copy that races a
        change of the queue is taken again."""
        for _ in range(5):
            try:
                running, waiting = list(self._scheduler.running), list(self._scheduler.waiting)
                break
            except RuntimeError:  # deque mutated during the copy
                continue
        else:
            return [], []
        names = lambda seqs: sorted({seq.model for seq in seqs if seq.adapter_keys})  # noqa: E731
        return names(running), names(waiting)

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    @property
    def idle(self) -> bool:
        return not self._scheduler.running and not self._scheduler.waiting

    # ---- engine thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._runner, self._adapters = self._load_runner()
            self._blocks = BlockManager(self._runner.num_blocks, self._runner.block_size, self.config.prefix_caching)
            self._scheduler.blocks = self._blocks
            self._digits = digit_widths(self._runner.tokenizer)
            self._digit_ids = torch.tensor(sorted(self._digits), dtype=torch.long)
            self._text_keys, self._text_widths = text_words(self._runner.tokenizer)
        except BaseException as exc:  # reported to the server, which exits non-zero
            self.load_error = exc
            log.error("model load failed: %s", exc)
            if self._on_fatal:
                self._on_fatal(exc)
            return
        self.ready.set()
        try:
            self._loop()
        except BaseException as exc:
            log.exception("engine crashed")
            self._fail_all(f"engine error: {exc}", kind="fault")
            if self._on_fatal:
                self._on_fatal(exc)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._tasks or not self.idle):
                    self._wakeup.wait()
                if self._stalled and not (self._stopping or self._tasks):
                    self._wakeup.wait(0.05)
                if self._stopping:
                    break
            self._run_tasks()
            self._reap_cancelled()
            worked = self._step()
            self._stalled = not worked and bool(self._scheduler.waiting)
            self._adapters.release_unused(self._scheduler.adapters_in_use())
        self._adapters.close()
        self._grammar_pool.shutdown(wait=False)
        self._fail_all("server is shutting down", kind="shutdown")

    def _run_tasks(self) -> None:
        while self._tasks:
            fn, future = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self._runner))
            except BaseException as exc:
                future.set_exception(exc)

    def _reap_cancelled(self) -> None:
        for seq in self._scheduler.cancelled():
            self._scheduler.release(seq)

    def _step(self) -> bool:
        """Run one scheduled forward pass and hand out its tokens; False when there was nothing to run."""
        stats = self._blocks.stats
        queried, hits = stats.queried_tokens, stats.hit_tokens
        self._stage_adapters()
        with self._wakeup:
            step = self._scheduler.schedule(self._adapters.acquire, self._step_cost.prompt_budget,
                                            self._step_cost.background_slack)
        self.metrics.prefix_queried_tokens.inc(stats.queried_tokens - queried)
        self.metrics.prefix_hit_tokens.inc(stats.hit_tokens - hits)
        for seq, message, kind in step.failed:
            self._fail(seq, message, kind=kind)
        for seq in step.preempted:
            self.metrics.preemptions.inc()
            log.info("request %s preempted (KV blocks ran out); it will be computed again", seq.request_id)
        self._start(step)
        if not step.work:
            return False
        started = time.perf_counter()
        self._runner.clear_blocks(self._blocks.take_fresh())
        items = [StepItem(seq.tokens[seq.num_computed : seq.num_computed + count], seq.num_computed,
                          seq.block_table, seq.row_adapter, seq.num_computed + count == len(seq.tokens))
                 for seq, count in step.work]
        self.metrics.batch_size.set(len(self._scheduler.running))
        decode_rows = step.decode_rows
        if decode_rows:
            self.metrics.decode_rows.observe(decode_rows)
        # grammar masks of the rows sampled this step: computed beside the forward pass, not after it
        masks = [self._grammar_pool.submit(seq.constraint.prepare) for seq, count in step.work
                 if seq.constraint is not None and seq.num_computed + count == len(seq.tokens)]
        logits = self._runner.step(items)
        for future in masks:
            future.exception()  # wait; a failed mask is computed again, and fails its row, when sampled
        sampled = []
        for seq, count in step.work:
            seq.num_computed += count
            self._blocks.commit(seq)
            if seq.num_computed == len(seq.tokens):
                sampled.append(seq)
        self._sample_and_accept(sampled, logits)  # reads the logits: on CUDA the step has finished here
        prompt_tokens = sum(count for _, count in step.work) - decode_rows
        self._step_cost.observe(decode_rows, prompt_tokens, time.perf_counter() - started, step.background)
        return True

    def _stage_adapters(self) -> None:
        """Put the adapters of the requests next in line on the device before the queue lock is taken.
        The scheduler plans under that lock (submit() waits on it), and a slot copy (a whole slot cleared
        and the weights written: milliseconds on a CPU, an upload on a GPU) there would hold every submit
        up; here it holds up nobody, and the scheduler then finds the adapters in place. Only as many
        requests as the batch has free rows, with the same rule as the scheduler: an adapter a running (or
        an earlier staged) request uses is never evicted for a later one. What fails or is still loading
        is left to the scheduler, which reports it."""
        room = self.config.max_batch_size - len(self._scheduler.running)
        if room <= 0:
            return
        for _ in range(5):  # submit() appends from other threads: a copy that races it is taken again
            try:
                head = [seq for seq, _ in zip(self._scheduler.waiting, range(room))]
                break
            except RuntimeError:
                continue
        else:
            return
        in_use = {key for seq in self._scheduler.running for key in seq.adapter_keys}
        for seq in head:
            keys = seq.adapter_keys
            if not keys or seq.cancelled:
                continue
            in_use |= set(keys)
            try:
                for key in keys:  # every load starts, as the scheduler's acquire would start them
                    self._adapters.acquire(key, in_use)
            except AdapterUnavailable:
                continue

    def _start(self, step: Step) -> None:
        """Clocks and output text of requests entering the batch for the first time."""
        now = time.monotonic()
        for seq in step.admitted:
            if not seq.admitted:
                seq.admitted, seq.admitted_time = True, now
                self.metrics.queue_wait.labels(self.metrics.label(seq.model)).observe(now - seq.arrival_time)
                seq.output = OutputText(self._runner.tokenizer, seq.params.stop)
                span = seq.params.loop_tokens
                if not span:
                    seq.loops = None
                elif seq.constraint is None:  # free text: compared as words, ended after three copies (two sentences: two)
                    seq.loops = LoopWatch(span, TEXT_MAX_PERIOD, keys=self._text_keys, repeats=TEXT_REPEATS,
                                          twice=TWICE_CHARS, widths=self._text_widths)
                else:  # a format: exact tokens and digit runs, steered off sooner
                    seq.loops = LoopWatch(min(span, NUDGE_SPAN), digits=self._digits)

    def _sample_and_accept(self, seqs: list[Sequence], logits) -> None:
        """Sample a token for every row and hand each to its request; a row's fault ends that request only."""
        try:
            for seq in seqs:  # a penalizing request's counts live on the device from its first token
                if seq.params.penalizes and seq.token_counts is None:
                    seq.token_counts = new_token_counts(logits)
            sampled = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                   [s.token_counts for s in seqs], [self._constraint_of(s) for s in seqs])
        except Exception as exc:  # nothing of this step can be trusted; the requests end, the engine goes on
            log.exception("sampling failed for a whole step of %d requests", len(seqs))
            for seq in seqs:
                self._fail(seq, f"sampling failed: {exc}")
            return
        for row in sampled.masked:
            self.metrics.non_finite_logits.labels(self.metrics.label(seqs[row].model)).inc()
            log.warning("request %s (%s): non-finite logits masked", seqs[row].request_id, seqs[row].model)
        for row, seq in enumerate(seqs):
            error = sampled.errors.get(row)
            if error is None:
                try:
                    self._accept_token(seq, sampled.tokens[row], sampled.logprobs[row])
                    continue
                except FormatDeadEnd as exc:  # the request's format, not the server, ends it
                    log.warning("request %s: %s", seq.request_id, exc)
                    self._fail(seq, str(exc), kind="format")
                    continue
                except Exception as exc:  # detokenizing or emitting this request broke
                    log.exception("request %s failed after sampling", seq.request_id)
                    error = f"generation failed: {exc}"
            self._fail(seq, error)

    def _fail(self, seq: Sequence, message: str, kind: str = "fault") -> None:
        """End one request with an error (it leaves the batch, its metrics are counted); others go on."""
        self._scheduler.release(seq)
        self.metrics.request_failures.labels(self.metrics.label(seq.model), kind).inc()
        try:
            seq.emit(EngineOutput("", "error", len(seq.prompt_ids), seq.generated, error=message, error_kind=kind))
        except Exception:  # the listener is gone; nothing more to tell it
            log.exception("could not report the failure of request %s", seq.request_id)

    def _accept_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        if seq.constraint is not None:
            seq.constraint.accept(token)
        seq.generated += 1
        seq.tokens.append(token)
        if logprob is not None and token not in seq.stop_token_ids:  # a stop token is not part of the answer
            seq.pending_logprobs.append(logprob)
        record_token_time(seq, self.metrics)
        if token in seq.stop_token_ids:  # the stop token's own text is never shown
            text, _ = seq.output.finish()
            self._finish(seq, "stop", text)
            return
        text, stopped = seq.output.push(token)
        period = seq.loops.push(seq.tokens, seq.generated) if seq.loops is not None and not stopped else 0
        if seq.constraint is not None and (period or (seq.loops is not None and not stopped
                                                      and seq.loops.runaway_digits)):
            # steered off its loop or its run of digits (every digit, the loop's next one among them), never
            # cut (loops.py); counted where a token was really ruled out (_constraint_of)
            seq.loop_ban = self._digit_ids if seq.loops.runaway_digits else seq.tokens[len(seq.tokens) - period]
            period = 0
        if not stopped and seq.constraint is not None and seq.constraint.complete:
            tail, _ = seq.output.finish()  # the format is complete: nothing may follow
            self._finish(seq, "stop", text + tail)
        elif period:
            tail, _ = seq.output.finish()  # repeating itself: nothing new can follow (loops.py)
            self.metrics.loop_stops.labels(self.metrics.label(seq.model)).inc()
            self._finish(seq, "stop", text + tail)
        elif not stopped and seq.generated >= seq.params.max_tokens:
            tail, stopped = seq.output.finish()
            self._finish(seq, "stop" if stopped else "length", text + tail)
        elif stopped:
            self._finish(seq, "stop", text)
        elif text:
            seq.emit(EngineOutput(text, logprobs=seq.take_logprobs()))

    def _constraint_of(self, seq: Sequence):
        """What masks the row's logits this step: its format, and the token its loop would take next (or every
        digit, after a run of them) ruled out for this one step when it was caught in one."""
        ban, seq.loop_ban = seq.loop_ban, None
        if ban is None or seq.constraint is None:
            return seq.constraint
        nudged = self.metrics.loop_nudges.labels(self.metrics.label(seq.model)).inc
        return partial(steer_off, seq.constraint, ban, nudged=nudged)

    def _finish(self, seq: Sequence, reason: str, text: str) -> None:
        seq.finish_time = time.monotonic()
        self.metrics.e2e.labels(self.metrics.label(seq.model)).observe(seq.finish_time - seq.arrival_time)
        self.metrics.prompt_tokens.labels(self.metrics.label(seq.model)).inc(len(seq.prompt_ids))
        self.metrics.generation_tokens.labels(self.metrics.label(seq.model)).inc(seq.generated)
        self._scheduler.release(seq)
        seq.emit(EngineOutput(text, reason, len(seq.prompt_ids), seq.generated, logprobs=seq.take_logprobs(),
                              cached_tokens=seq.cached_tokens))

    def _fail_all(self, message: str, kind: str) -> None:
        with self._wakeup:
            pending = self._scheduler.drain()
        for seq in pending:
            self._fail(seq, message, kind)
