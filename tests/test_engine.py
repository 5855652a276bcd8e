"""The engine thread on a tiny model: continuous batching, cancellation, budgets, queue limits."""
import re
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.lora import BaseShape
from server.engine.engine import Engine, EngineConfig, QueueFull
from server.metrics import Metrics
from server.engine.residency import AdapterCache
from server.engine.model_runner import ModelRunner
from server.engine.sampling import SamplingParams, make_generator
from server.engine.sequence import Sequence
from tests.support.harness import make_peft_adapter, wait_until


class Collector:
    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason:
            self.done.set()

    @property
    def text(self):
        return "".join(o.text for o in self.outputs)

    @property
    def final(self):
        return self.outputs[-1]


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def tiny_runtime(model, tokenizer, slots, kv_blocks=None):
    """A runner whose pool holds `slots` full 256-token requests (or `kv_blocks` blocks of 16 tokens)."""
    runner = ModelRunner(model, tokenizer, (kv_blocks or slots * 16) + 1, 16, 256)
    cache = AdapterCache(runner.lora, BaseShape.from_config(model.config), max_device=4, max_cpu=4,
                         wake=lambda: None, on_freed=lambda folder: None, metrics=Metrics())
    return runner, cache


def make_engine(model, tokenizer, max_batch=4, max_queued=16, kv_blocks=None, **config) -> Engine:
    engine = Engine(lambda: tiny_runtime(model, tokenizer, max_batch, kv_blocks),
                    EngineConfig(max_batch_size=max_batch, max_queued=max_queued, **config), Metrics())
    engine.start()
    assert engine.ready.wait(60)
    return engine


def make_seq(prompt, max_tokens=16, temperature=0.0, seed=None, stop=(), stop_ids=frozenset(), **penalties):
    collector = Collector()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=list(stop), **penalties)
    seq = Sequence("r", list(prompt), None, params, frozenset(stop_ids), make_generator(seed, torch.device("cpu")),
                   collector)
    return seq, collector


PROMPTS = [[1, 504, 3575, 282, 4649], [1, 9690, 198, 2683], [1, 22, 33, 44, 55, 66, 77], [1, 5, 6]]


def _steps_over(engine, rows: int) -> float:
    """Decode steps that ran more than `rows` requests together (`rows` is a bucket of the engine's histogram)."""
    buckets = {float(s.labels["le"]): s.value for metric in engine.metrics.decode_rows.collect()
               for s in metric.samples if s.name.endswith("_bucket")}
    return buckets[float("inf")] - buckets[float(rows)]


def test_requests_joining_a_running_batch_get_their_solo_answer(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    try:
        solo = []
        for prompt in PROMPTS:
            seq, out = make_seq(prompt, max_tokens=20)
            engine.submit(seq)
            assert out.done.wait(30)
            solo.append(out.text)
        # staggered arrivals: each request joins once the one before is mid-generation
        collectors, previous = [], None
        for prompt in PROMPTS:
            if previous is not None:
                assert wait_until(lambda: previous.generated >= 2, 30, interval=0.001)
            seq, out = make_seq(prompt, max_tokens=20)
            engine.submit(seq)
            collectors.append(out)
            previous = seq
        for out in collectors:
            assert out.done.wait(30)
        assert [c.text for c in collectors] == solo
        assert all(c.final.finish_reason == "length" and c.final.completion_tokens == 20 for c in collectors)
        assert _steps_over(engine, 2) > 0  # they really shared decode steps, three or four at a time
    finally:
        engine.stop()


def test_requests_finishing_early_keep_the_others_answers_intact(tiny_model, tokenizer):
    """Short requests leave first and give their KV blocks back while the others decode on."""
    engine = make_engine(tiny_model, tokenizer)
    budgets = [3, 25, 7, 25]
    try:
        solo = []
        for prompt, budget in zip(PROMPTS, budgets):
            seq, out = make_seq(prompt, max_tokens=budget)
            engine.submit(seq)
            assert out.done.wait(30)
            solo.append(out.text)
        collectors = []
        for prompt, budget in zip(PROMPTS, budgets):
            seq, out = make_seq(prompt, max_tokens=budget)
            engine.submit(seq)
            collectors.append(out)
        for out in collectors:
            assert out.done.wait(30)
        assert [c.text for c in collectors] == solo
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)

    def generate(seed, temperature=1.0):
        seq, out = make_seq(PROMPTS[0], max_tokens=12, temperature=temperature, seed=seed)
        engine.submit(seq)
        assert out.done.wait(30)
        return out.text

    try:
        first = generate(42)
        assert generate(42) == first
        # the temperature is really applied: other seeds, and greedy decoding, give other answers
        others = {generate(seed) for seed in (1, 2, 3)}
        assert len(others | {first}) >= 3 and generate(None, temperature=0.0) not in others | {first}
    finally:
        engine.stop()


def test_penalized_requests_count_their_own_tokens_in_any_batch(tiny_model, tokenizer):
    """Presence/frequency penalties through the engine: each request's counts (on the device, updated by
    the step that samples each token) are its own, so a penalized request gets its solo answer beside
    others, penalized or not; and the penalty really acts: greedy decoding of the tiny model repeats
    tokens, with the penalties it does not."""
    engine = make_engine(tiny_model, tokenizer)
    penalties = [{}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"frequency_penalty": 1.0},
                 {"presence_penalty": -0.5}]

    def answer_ids(seq):
        return seq.tokens[len(seq.prompt_ids):]

    try:
        solo = []
        for prompt, penalty in zip(PROMPTS, penalties):
            seq, out = make_seq(prompt, max_tokens=24, **penalty)
            engine.submit(seq)
            assert out.done.wait(30)
            solo.append(answer_ids(seq))
        plain, _ = make_seq(PROMPTS[1], max_tokens=24)
        engine.submit(plain)
        assert _.done.wait(30)
        assert len(set(answer_ids(plain))) < 24 and len(set(solo[1])) == 24
        together = [make_seq(prompt, max_tokens=24, **penalty) for prompt, penalty in zip(PROMPTS, penalties)]
        for seq, _ in together:
            engine.submit(seq)
        for seq, out in together:
            assert out.done.wait(30)
        assert [answer_ids(seq) for seq, _ in together] == solo
    finally:
        engine.stop()


def test_cancel_frees_the_slot_and_others_continue(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch=2)
    try:
        long_seq, long_out = make_seq(PROMPTS[0], max_tokens=240)
        other_seq, other_out = make_seq(PROMPTS[1], max_tokens=240)
        engine.submit(long_seq)
        engine.submit(other_seq)
        assert wait_until(lambda: engine.num_running == 2, 10, interval=0.002)
        engine.cancel(long_seq)
        assert wait_until(lambda: not long_seq.running, 2, interval=0.002)
        assert other_out.done.wait(30)
        assert other_out.final.completion_tokens == 240
        assert not long_out.done.is_set() and long_seq.generated < 240
    finally:
        engine.stop()


def test_stop_token_ends_generation_and_is_not_shown(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    try:
        seq, out = make_seq(PROMPTS[2], max_tokens=20)
        engine.submit(seq)
        assert out.done.wait(30)
        first_ids = tokenizer(out.text, add_special_tokens=False)["input_ids"]
        stop_id = first_ids[2]
        seq, stopped = make_seq(PROMPTS[2], max_tokens=20, stop_ids={stop_id})
        engine.submit(seq)
        assert stopped.done.wait(30)
        assert stopped.final.finish_reason == "stop"
        assert out.text.startswith(stopped.text)
        assert tokenizer.decode([stop_id]) not in stopped.text[len(tokenizer.decode(first_ids[:2])):]
    finally:
        engine.stop()


def test_queue_full_is_refused(tiny_model, tokenizer):
    engine = Engine(lambda: tiny_runtime(tiny_model, tokenizer, 1), EngineConfig(max_batch_size=1, max_queued=1),
                    Metrics())  # not started: nothing drains
    seq, _ = make_seq(PROMPTS[0])
    engine.submit(seq)
    with pytest.raises(QueueFull):
        engine.submit(make_seq(PROMPTS[1])[0])


# ---- priority (vLLM's: lower runs first) -------------------------------------------------------

def test_a_high_priority_request_takes_a_low_priority_row_at_once_and_nobody_loses_tokens(tiny_model, tokenizer):
    """Batch work (priority 10) fills every row; an interactive request (0) preempts the newest of it in
    the next step instead of waiting for a row, and the preempted request still ends with its solo answer."""
    engine = make_engine(tiny_model, tokenizer, max_batch=2)
    try:
        solo = []
        for prompt in PROMPTS[:2]:
            seq, out = make_seq(prompt, max_tokens=30)
            engine.submit(seq)
            assert out.done.wait(60)
            solo.append(out.text)
        low = [make_seq(prompt, max_tokens=30) for prompt in PROMPTS[:2]]
        for seq, _ in low:
            seq.priority = 10
            engine.submit(seq)
        assert wait_until(lambda: all(seq.generated >= 3 for seq, _ in low), 30, interval=0.001)
        interactive, answer = make_seq(PROMPTS[3], max_tokens=5)
        engine.submit(interactive)
        at_submit = max(seq.generated for seq, _ in low)
        assert answer.done.wait(30)
        # it started while the batch rows were mid-answer: a row was handed over, not waited for
        assert all(not out.done.is_set() for _, out in low)
        assert max(seq.generated for seq, _ in low) - at_submit < 12
        assert sum(seq.preemptions for seq, _ in low) == 1 and low[1][0].preemptions == 1  # the newest gave way
        for (seq, out), text in zip(low, solo):
            assert out.done.wait(60)
            assert out.text == text and out.final.completion_tokens == 30
    finally:
        engine.stop()


def test_waiting_requests_are_admitted_by_priority_then_arrival(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch=1)
    try:
        first, first_out = make_seq(PROMPTS[0], max_tokens=60)
        engine.submit(first)
        assert wait_until(lambda: first.generated >= 1, 30, interval=0.001)
        finished = []
        queued = [(5, "a"), (1, "b"), (5, "c"), (0, "d"), (1, "e")]
        for priority, name in queued:
            seq, _ = make_seq(PROMPTS[1], max_tokens=3)
            seq.priority = priority
            seq.emit = lambda out, name=name: out.finish_reason and finished.append(name)
            engine.submit(seq)
        assert first_out.done.wait(60)
        assert wait_until(lambda: len(finished) == len(queued), 30)
        assert finished == ["d", "b", "e", "a", "c"]
        assert first.preemptions == 0  # equal priority never preempts
    finally:
        engine.stop()


def test_a_high_priority_request_takes_kv_blocks_from_low_priority_ones(tiny_model, tokenizer):
    """The pool is full of batch work's KV: an interactive request frees blocks by preempting it."""
    engine = make_engine(tiny_model, tokenizer, max_batch=4, kv_blocks=8)  # 128 tokens of KV in all
    try:
        low = [make_seq(PROMPTS[i], max_tokens=55) for i in range(2)]
        for seq, _ in low:
            seq.priority = 3
            engine.submit(seq)
        assert wait_until(lambda: all(len(seq.block_table) >= 4 for seq, _ in low), 30, interval=0.001)
        interactive, answer = make_seq(list(range(1, 40)), max_tokens=5)
        engine.submit(interactive)
        assert answer.done.wait(30)
        assert answer.final.completion_tokens == 5
        assert sum(seq.preemptions for seq, _ in low) >= 1
        for _, out in low:
            assert out.done.wait(60) and out.final.completion_tokens == 55
    finally:
        engine.stop()


# ---- fault isolation: a fault in one request ends that request, never the engine ----------------

def _serves_after(engine, tokenizer_free_prompt=PROMPTS[3]):
    seq, out = make_seq(tokenizer_free_prompt, max_tokens=6)
    engine.submit(seq)
    assert out.done.wait(30)
    return out.final


def test_a_request_whose_emit_raises_fails_alone(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    try:
        good, good_out = make_seq(PROMPTS[0], max_tokens=30)
        seen = []

        def broken_emit(out):  # e.g. the HTTP side's loop went away under us
            seen.append(out)
            if out.finish_reason is None:
                raise RuntimeError("listener exploded")

        bad, _ = make_seq(PROMPTS[1], max_tokens=30)
        bad.emit = broken_emit
        engine.submit(good)
        engine.submit(bad)
        assert good_out.done.wait(30)
        assert good_out.final.finish_reason == "length" and good_out.final.completion_tokens == 30
        assert wait_until(lambda: seen and seen[-1].finish_reason == "error", 10)
        assert seen[-1].error_kind == "fault" and "listener exploded" in seen[-1].error
        assert not bad.running and engine.num_running == 0
        assert _serves_after(engine).finish_reason == "length"
    finally:
        engine.stop()


def test_a_request_whose_detokenizer_raises_fails_alone(tiny_model, tokenizer, monkeypatch):
    import server.engine.engine as engine_module

    class ExplodingOutput(engine_module.OutputText):
        def push(self, token_id):
            raise UnicodeError("detokenizer exploded")

    engine = make_engine(tiny_model, tokenizer)
    try:
        good, good_out = make_seq(PROMPTS[0], max_tokens=10)
        engine.submit(good)
        assert good_out.done.wait(30)
        monkeypatch.setattr(engine_module, "OutputText", ExplodingOutput)
        bad, bad_out = make_seq(PROMPTS[1], max_tokens=10)
        engine.submit(bad)
        assert bad_out.done.wait(30)
        assert bad_out.final.finish_reason == "error" and "detokenizer exploded" in bad_out.final.error
        monkeypatch.undo()
        assert _serves_after(engine).finish_reason == "length"
    finally:
        engine.stop()


def test_a_row_that_cannot_be_sampled_fails_alone(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    try:
        good, good_out = make_seq(PROMPTS[0], max_tokens=12)
        bad, bad_out = make_seq(PROMPTS[1], max_tokens=12)
        bad.params.logit_bias = {10**9: 1.0}  # past the edge's checks: indexing the logits raises
        engine.submit(good)
        engine.submit(bad)
        assert good_out.done.wait(30) and bad_out.done.wait(30)
        assert good_out.final.completion_tokens == 12
        assert bad_out.final.finish_reason == "error" and bad_out.final.error_kind == "fault"
        assert _serves_after(engine).finish_reason == "length"
    finally:
        engine.stop()


def test_an_adapter_that_makes_logits_nan_fails_its_requests_only(tiny_model, tokenizer):
    """Weights that admission would refuse (finite, but far over its magnitude limit), put straight into
    the engine beside a base request: the adapter's row overflows to inf/NaN and fails alone, the sampler
    never sees NaN, and the base row (in the same wide LoRA step, where it is multiplied by the adapter's
    weights and zeroed) is untouched. Non-finite weights the engine refuses at load (they would reach
    every row of such a step: 0 * NaN is NaN)."""
    from adapters.lora import LoraWeights

    shape = BaseShape.from_config(tiny_model.config)
    inp, out = shape.linear_features["q_proj"]
    weights = LoraWeights(16, {(0, "q_proj"): (torch.ones(inp, 16), torch.full((16, out), 1e38))}, ("q_proj",), None)
    nan = LoraWeights(16, {(0, "q_proj"): (torch.ones(inp, 16), torch.full((16, out), float("nan")))}, ("q_proj",),
                      None)
    metrics = Metrics()
    engine = Engine(lambda: tiny_runtime(tiny_model, tokenizer, 4), EngineConfig(max_batch_size=4, max_queued=16),
                    metrics)
    engine.start()
    assert engine.ready.wait(60)
    try:
        engine.register_adapter("nan-weights", "/nonexistent", nan).result(10)
        refused, refused_out = make_seq(PROMPTS[1], max_tokens=16)
        refused.adapter_key, refused.model = "nan-weights", "nan-weights"
        engine.submit(refused)
        assert refused_out.done.wait(30)
        assert refused_out.final.finish_reason == "error" and "NaN or infinite" in refused_out.final.error
        engine.register_adapter("nan-key", "/nonexistent", weights).result(10)
        good, good_out = make_seq(PROMPTS[0], max_tokens=16)
        bad, bad_out = make_seq(PROMPTS[1], max_tokens=16, temperature=1.0)
        bad.adapter_key, bad.model = "nan-key", "nan-expert"
        engine.submit(good)
        engine.submit(bad)
        assert good_out.done.wait(30) and bad_out.done.wait(30)
        assert good_out.final.finish_reason == "length" and good_out.final.completion_tokens == 16
        assert bad_out.final.finish_reason == "error" and "no finite logits" in bad_out.final.error
        assert metrics.non_finite_logits.labels("nan-expert")._value.get() == 1
        assert metrics.request_failures.labels("nan-expert", "fault")._value.get() == 1
        assert _serves_after(engine).finish_reason == "length"
    finally:
        engine.stop()


def test_a_cold_adapter_loads_in_the_background_while_the_batch_decodes(tiny_model, tokenizer, tmp_path, monkeypatch):
    import server.engine.residency as residency

    folder = make_peft_adapter(tiny_model, tmp_path / "cold", seed=4, b_std=0.2)
    real_load, load_started = residency.load_lora, threading.Event()

    def slow_load(*args, **kwargs):  # a disk slow enough to see what the engine does meanwhile
        load_started.set()
        time.sleep(1.0)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(residency, "load_lora", slow_load)
    engine = make_engine(tiny_model, tokenizer)
    try:
        engine.register_adapter("cold-key", str(folder)).result(10)  # disk tier only
        assert engine.adapter_tier("cold-key") == "disk"
        running, running_out = make_seq(PROMPTS[0], max_tokens=200)
        engine.submit(running)
        assert wait_until(lambda: running.generated >= 1, 30, interval=0.001)
        cold, cold_out = make_seq(PROMPTS[1], max_tokens=4)
        cold.adapter_key = "cold-key"
        engine.submit(cold)
        assert load_started.wait(10)
        during = running.generated
        assert wait_until(lambda: cold.generated >= 1, 30, interval=0.001)
        assert running.generated - during >= 5  # the running request kept decoding through the load
        assert cold_out.done.wait(30) and cold_out.final.completion_tokens == 4
        assert engine.adapter_tier("cold-key") == "device"
        assert running_out.done.wait(60) and running_out.final.completion_tokens == 200
    finally:
        engine.stop()


def test_copying_an_adapter_onto_the_device_never_holds_up_submit(tiny_model, tokenizer, tmp_path):
    """The slot copy happens before the engine takes the queue lock, so submit() (the HTTP side's call)
    does not wait for it; the copy is made slow here to see that."""
    from adapters.lora import load_lora

    folder = make_peft_adapter(tiny_model, tmp_path / "a", seed=5, b_std=0.2)
    engine = make_engine(tiny_model, tokenizer)
    try:
        weights = load_lora(folder, BaseShape.from_config(tiny_model.config))
        engine.register_adapter("a", str(folder), weights).result(10)  # in CPU memory: next is the slot copy
        bank = engine.call(lambda runner: runner.lora).result(10)
        real_add, copying = bank.add, threading.Event()

        def slow_add(name, adapter_weights):
            copying.set()
            time.sleep(1.0)
            real_add(name, adapter_weights)

        bank.add = slow_add
        seq, out = make_seq(PROMPTS[0], max_tokens=4)
        seq.adapter_key = "a"
        engine.submit(seq)
        assert copying.wait(10)
        other, other_out = make_seq(PROMPTS[1], max_tokens=4)
        started = time.monotonic()
        engine.submit(other)
        assert time.monotonic() - started < 0.3  # not the second the copy takes
        assert out.done.wait(30) and out.final.completion_tokens == 4
        assert other_out.done.wait(30) and other_out.final.completion_tokens == 4
    finally:
        engine.stop()


def test_an_answer_that_repeats_itself_ends_with_stop_and_one_without_the_watch_runs_on(tiny_model, tokenizer):
    """A random tiny model falls into a loop; the loop watch (loops.py) ends it where its last tokens are one
    block repeated (three copies and 24 tokens at least: free text), and the same request with the watch off
    runs to max_tokens."""
    engine = make_engine(tiny_model, tokenizer)
    try:
        free, runs_on = make_seq(PROMPTS[0], max_tokens=200)
        engine.submit(free)
        watched, ends = make_seq(PROMPTS[0], max_tokens=200, loop_tokens=24)
        engine.submit(watched)
        assert runs_on.done.wait(60) and ends.done.wait(60)
        assert runs_on.final.finish_reason == "length" and runs_on.final.completion_tokens == 200
        assert ends.final.finish_reason == "stop" and ends.final.completion_tokens < 200
        answer = watched.tokens[len(PROMPTS[0]):]
        assert answer == free.tokens[len(PROMPTS[0]):][:len(answer)]  # the same answer, ended early
        tail = answer[-24:]
        assert any(tail[p:] == tail[:-p] for p in range(1, 9)), tail  # periodic: a short block said 3+ times
        counted = sum(s.value for m in engine.metrics.loop_stops.collect() for s in m.samples if s.name.endswith("_total"))
        assert counted == 1
    finally:
        engine.stop()


def test_a_constrained_answer_never_runs_more_digits_than_the_watch_allows_unless_its_format_asks_for_them(
        tiny_model, tokenizer):
    """A format that allows digits or letters, and a bias that makes the tiny model want digits: with the
    loop watch on, a run of DIGIT_RUN digits is followed by a letter (loops.py); with it off, digits run on;
    a format that allows only digits keeps them all."""
    from server.api.protocol import CompletionRequest
    from server.api.schemas import SchemaPolicy
    from server.api.structured import OutputFormats
    from server.engine.loops import DIGIT_RUN, digit_widths

    formats = OutputFormats(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), SchemaPolicy(16))
    bias = {token: 30.0 for token in digit_widths(tokenizer)}

    def run(regex: str, loop_tokens: int) -> str:
        output = formats.for_guided(CompletionRequest.model_validate({"model": "m", "prompt": "x",
                                                                      "guided_regex": regex}))
        seq, out = make_seq(PROMPTS[1], max_tokens=70, logit_bias=bias, loop_tokens=loop_tokens)
        seq.constraint = formats.constraints(output, 1)[0]
        engine.submit(seq)
        assert out.done.wait(60) and out.final.finish_reason == "stop", out.final
        return out.text

    engine = make_engine(tiny_model, tokenizer)
    try:
        def nudges() -> float:
            return sum(s.value for m in engine.metrics.loop_nudges.collect() for s in m.samples
                       if s.name.endswith("_total"))

        steered = run("[0-9a-z]{60}", 64)
        runs = [len(r) for r in re.findall("[0-9]+", steered)]
        counted = nudges()
        assert len(steered) == 60 and max(runs) == DIGIT_RUN and counted >= 1, steered
        assert run("[0-9a-z]{60}", 0).isdigit() and nudges() == counted  # the watch off: 60 digits, no nudge
        assert run("[0-9]{40}", 64).isdigit()  # only digits allowed: kept (test_loops: and not counted)
    finally:
        engine.stop()
