"""GPU smoke checks (issue 14): does the engine's GPU path compute what it should, before it is timed?

    python -m loadtests.gpu_smoke OUT_DIR                            # CUDA, a 2-layer Llama-2-7B-width NF4 base
    python -m loadtests.gpu_smoke OUT_DIR --shape tiny --device cpu  # seconds: checks the script itself

Checks, in this order, each written to OUT_DIR/smoke.jsonl the moment it ends (a failing check is
recorded with its error and the next one runs):
  versions       torch, CUDA, bitsandbytes, transformers, peft; the device
  nf4_linear     a bitsandbytes NF4 linear at 1, 8 and 64 rows against x @ dequantized(W).T
  runner         the model runner's prefill logits and greedy tokens against Hugging Face's forward/generate
  engine         the engine with a sampler mix (greedy, temperature + top_p + seed, penalties, logit_bias), a
                 cancel, and a request on an adapter still on disk arriving while the others decode
  sampling       draws on the device against a known distribution (top_p, zero-probability tokens, seeds),
                 and sample_batch timed at batch 64 over 32k tokens
  slots          memory of a 64-slot adapter pool at rank 16 (what `max_gpu_adapters: 64` reserves)
  adapter_load   a rank-16 adapter into slots of rank 64: bytes sent and written per load (its rank only), time
  profile        5 decode steps of 8 rows over 2 interleaved adapters under the profiler: host time,
                 device time and kernels (CPU: operators) per step; top operators in profile.txt
  peft           mixed and interleaved adapter rows against PEFT applied to each row alone (on a fresh load)
  lora_kernels   the Triton LoRA kernels (lora_kernels: triton) against the torch path: a mixed prefill, and
                 decode steps of 8 and 64 interleaved rows timed both ways
  cuda_graphs    the decode shapes captured at start (count, seconds, memory against its budget), then steps
                 replayed from them against an eager runner on the same rows (8 and 64 rows, two adapters and
                 the base), every step compared, both timed; no shape may be disabled
Files: progress.log, smoke.jsonl, smoke.md (rewritten after every check). Exit code 0 when every check passed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from loadtests.bench_gpu import (SHAPES, llama_config, load_nf4, save_random_base, start_engine,
                                 write_random_adapter)
from loadtests.provenance import stamp

PROMPTS = [[1, 17, 29, 45, 88, 101, 7, 300], [1, 250, 12, 9], [1, 400, 401, 402, 403, 404, 405, 406, 407, 408, 5]]


class Smoke:
    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.meta, self.results = out_dir, meta, []
        self.started = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.out_dir / "progress.log", "a") as handle:
            handle.write(line + "\n")

    def run(self, name: str, check, *args) -> dict:
        self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            record = {"check": name, **check(*args)}
        except Exception as exc:  # recorded; the next check still runs
            record = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-2000:]}
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.results.append(record)
        with open(self.out_dir / "smoke.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        (self.out_dir / "smoke.md").write_text(self.markdown())
        self.log(f"{name}: {'ok' if record.get('ok') else 'FAILED'} {record.get('error', '')}")
        return record

    def markdown(self) -> str:
        lines = [f"GPU smoke: `{self.meta['command']}`, {self.meta['date'][:10]}, {self.meta['device_name']}, "
                 f"{self.meta['shape']} x {self.meta['layers']} layers, {self.meta['dtype']}", "",
                 "| check | ok | figures |", "| --- | --- | --- |"]
        for record in self.results:
            figures = {k: v for k, v in record.items() if k not in ("check", "ok", "traceback")}
            lines.append(f"| {record['check']} | {'yes' if record.get('ok') else '**no**'} | "
                         f"{json.dumps(figures, default=str)[:400]} |")
        return "\n".join(lines) + "\n"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_decode(driver, tokens: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    """One decode step of `driver` (a RunnerDriver): its logits and its wall seconds, synchronised."""
    _sync(device)
    start = time.perf_counter()
    logits = driver.decode(tokens)
    _sync(device)
    return logits, time.perf_counter() - start


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_versions(device: torch.device) -> dict:
    import bitsandbytes
    import peft
    import transformers

    record = {"ok": True, "torch": torch.__version__, "cuda": torch.version.cuda,
              "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__}
    if device.type == "cuda":
        record.update(device=torch.cuda.get_device_name(device), capability=torch.cuda.get_device_capability(device),
                      memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return record


def check_nf4_linear(model, dtype: torch.dtype, tolerance: float) -> dict:
    """The quantized q_proj of layer 0 against a matmul with its dequantized weight, per row count; and
    whether a row's output is the same bits whatever the row count (true on CPU, not expected on CUDA)."""
    import bitsandbytes.functional as bnbf

    linear = model.model.layers[0].self_attn.q_proj
    weight = bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).to(torch.float32)
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, linear.in_features, generator=generator).to(linear.weight.device, dtype)
    errors, first_rows = {}, []
    with torch.no_grad():
        for rows in (1, 8, 64):
            y = linear(x64[:rows])
            errors[rows] = round(_rel(y, x64[:rows].float() @ weight.T), 5)
            first_rows.append(y[0].float())
    invariant = all(torch.equal(first_rows[0], other) for other in first_rows[1:])
    return {"ok": all(err < tolerance for err in errors.values()), "relative_error_by_rows": errors,
            "tolerance": tolerance, "row_bits_same_for_1_8_64_rows": invariant}


def check_runner(model, tokenizer, tolerance: float, tokens: int = 12) -> dict:
    """Prefill logits of the runner against Hugging Face's forward on the same NF4 model, and greedy
    tokens against generate() (random weights: near-ties can make greedy paths part, so the agreeing
    prefix is reported; the logits decide)."""
    from tests.support.harness import RunnerDriver

    driver = RunnerDriver.build(model, tokenizer, tokens=512, context_window=64)
    errors, agree = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ours = driver.prefill({0: (prompt, None)})[0]
            theirs = model(torch.tensor([prompt], device=model.device)).logits[0, -1]
            errors.append(round(_rel(ours, theirs), 5))
            greedy = [int(ours.argmax())]
            for _ in range(tokens - 1):
                greedy.append(int(driver.decode({0: greedy[-1]})[0].argmax()))
            driver.release(0)
            generated = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=tokens,
                                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            same = next((i for i, (a, b) in enumerate(zip(greedy, generated)) if a != b), len(greedy))
            agree.append(same)
    return {"ok": max(errors) < tolerance, "prefill_logits_relative_error": errors, "tolerance": tolerance,
            f"greedy_tokens_agreeing_of_{tokens}": agree}


def check_engine(model, tokenizer, folders: list[Path], device: torch.device) -> dict:
    from server.engine.sampling import SamplingParams, make_generator
    from server.engine.sequence import Sequence

    engine, _ = start_engine(model, tokenizer, 8, 64, len(folders), 16)
    try:
        names = [folder.name for folder in folders]
        for name, folder in zip(names[:-1], folders[:-1]):
            engine.register_adapter(name, str(folder)).result(60)
        outputs: dict[str, list] = {}
        finished = threading.Event()
        lock = threading.Lock()
        expected = set()

        def emit(request_id):
            def on_output(output):
                with lock:
                    outputs.setdefault(request_id, []).append(output)
                    if output.finish_reason and set(k for k, v in outputs.items() if v[-1].finish_reason) >= expected:
                        finished.set()
            return on_output

        def submit(request_id, adapter, tokens=24, **sampling):
            params = SamplingParams(max_tokens=tokens, ignore_eos=True, **sampling)
            seq = Sequence(request_id, PROMPTS[len(outputs) % len(PROMPTS)], adapter, params, frozenset(),
                           make_generator(sampling.get("seed"), engine.device), emit(request_id),
                           model=adapter or "base")
            engine.submit(seq)
            return seq

        plan = {"greedy-base": (None, {"temperature": 0.0}),
                "sampled-seeded": (names[0], {"temperature": 0.8, "top_p": 0.9, "seed": 7}),
                "penalties": (names[1], {"temperature": 0.7, "presence_penalty": 0.5, "frequency_penalty": 0.5}),
                "logit-bias": (names[0], {"temperature": 0.0, "logit_bias": {5: 100.0}})}
        expected = set(plan) | {"disk-adapter"}
        for request_id, (adapter, sampling) in plan.items():
            submit(request_id, adapter, **sampling)
        doomed = submit("cancelled", names[1], tokens=1000)
        deadline = time.monotonic() + 60
        while not outputs.get("cancelled") and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.cancel(doomed)
        # an adapter only on disk, registered and asked for while the batch decodes: loaded beside the steps
        engine.register_adapter(names[-1], str(folders[-1])).result(60)
        submit("disk-adapter", names[-1], temperature=0.0)
        if not finished.wait(300):
            raise RuntimeError(f"requests did not finish: {sorted(expected - set(outputs))}")
        time.sleep(0.2)
        last = {request_id: got[-1] for request_id, got in outputs.items()}
        errors = {request_id: out.error for request_id, out in last.items() if out.error}
        tokens = {request_id: last[request_id].completion_tokens for request_id in expected}
        biased = last["logit-bias"]
        record = {"completion_tokens": tokens, "errors": errors,
                  "cancelled_pieces": len(outputs.get("cancelled", [])),
                  "cancelled_finished": any(out.finish_reason for out in outputs.get("cancelled", [])),
                  "engine_idle_after": engine.idle, "logit_bias_text_sample": "".join(
                      out.text for out in outputs["logit-bias"])[:40]}
        record["ok"] = (not errors and all(count == 24 for count in tokens.values())
                        and not record["cancelled_finished"] and engine.idle and biased.finish_reason == "length")
        return record
    finally:
        engine.stop(30)


def check_sampling(device: torch.device) -> dict:
    """The sampler on the device: 3,000 rows drawn from a known distribution over a 1,000-token vocabulary
    (tokens of probability 0 between, across the draw's blocks), half of them cut by top_p 0.8, against the
    frequencies the distribution gives; seeded rows alone against the same rows in the batch; then
    `sample_batch` timed at batch 64 over a 32,000-token vocabulary (greedy, temperature 1, temperature 0.8 +
    top_p 0.9, greedy + penalties), each call ending in its one device -> host read."""
    from server.engine.sampling import SamplingParams, make_generator, new_token_counts, sample_batch

    vocab, rows = 1000, 3000
    chosen = [3, 300, 301, 999]
    probs = torch.zeros(vocab)
    probs[chosen] = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().to(device).repeat(rows, 1)
    half = rows // 2
    params = [SamplingParams(1, temperature=1.0)] * half + [SamplingParams(1, temperature=1.0, top_p=0.8)] * half
    generators = [make_generator(i, device) for i in range(rows)]
    tokens = torch.tensor(sample_batch(logits, params, generators).tokens)
    free = torch.bincount(tokens[:half], minlength=vocab).float() / half
    cut = torch.bincount(tokens[half:], minlength=vocab).float() / half
    expected_cut = torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9
    frequency_error = max(float((free[chosen] - probs[chosen]).abs().max()),
                          float((cut[chosen] - expected_cut).abs().max()))
    # draws of a token of probability 0: outside the four, or the one top_p 0.8 cuts
    outside = int((~torch.isin(tokens, torch.tensor(chosen))).sum()) + int((tokens[half:] == 999).sum())
    alone = sample_batch(logits[:5], params[:5], [make_generator(i, device) for i in range(5)]).tokens
    record = {"frequency_error": round(frequency_error, 4), "zero_probability_drawn": outside,
              "seeded_rows_same_alone": alone == tokens[:5].tolist()}
    big = torch.randn(64, 32000, generator=torch.Generator().manual_seed(0)).to(device) * 3
    cases = {"greedy": SamplingParams(1, temperature=0.0), "temperature_1": SamplingParams(1, temperature=1.0),
             "top_p_0.9": SamplingParams(1, temperature=0.8, top_p=0.9),
             "penalties": SamplingParams(1, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5)}
    for name, case in cases.items():
        counts = [new_token_counts(big) for _ in range(64)] if case.penalizes else None
        gens = [make_generator(i, device) for i in range(64)]
        sample_batch(big, [case] * 64, gens, counts)  # warm-up
        start = time.perf_counter()
        for _ in range(10):
            sample_batch(big, [case] * 64, gens, counts)
        record[f"ms_batch64_{name}"] = round((time.perf_counter() - start) / 10 * 1000, 2)
    record["ok"] = frequency_error < 0.04 and not outside and record["seeded_rows_same_alone"]
    return record


def check_slots(config, device: torch.device, dtype: torch.dtype) -> dict:
    from adapters.lora import BaseShape
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(config)
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    bank = LoraBank(device, dtype, shape, slots=64, max_rank=16)
    _sync(device)
    allocated = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
    _, pool = bank.memory()
    per_layer = pool / config.num_hidden_layers
    record = {"ok": True, "pool_bytes": pool, "allocated_bytes": allocated,
              "bytes_needed_with_step_stack": LoraBank.bytes_needed(shape, 64, 16, dtype),
              "pool_gib_at_32_layers": round(per_layer * 32 / 2**30, 2)}
    del bank
    return record


def check_adapter_load(config, device: torch.device, dtype: torch.dtype, folder: Path) -> dict:
    """A rank-16 adapter loaded into slots of rank 64 (the default max_adapter_rank) three times: bytes sent to
    the device and written into the slot per load (its rank only, not the slot: issue 30), time per load
    (synchronised; disk read excluded), and the slot's contents against the adapter's matrices."""
    from adapters.lora import BaseShape, load_lora
    from server.engine.lora_batch import LoraBank

    shape = BaseShape.from_config(config)
    weights = load_lora(folder, shape)
    bank = LoraBank(device, dtype, shape, slots=2, max_rank=64)
    slot_bytes = bank.layout.size * bank.pool.element_size()
    loads, walls = [], []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        bank.add("probe", weights)
        _sync(device)
        walls.append(round((time.perf_counter() - start) * 1000, 2))
        loads.append(dict(bank.last_load))
        slot = bank._residents["probe"].slot
        bank.remove("probe")
    key = next(iter(weights.pairs))
    a_view, b_view = bank._views(bank.pool[slot], key, weights.rank)
    a, b = weights.pairs[key]
    same = torch.equal(a_view.cpu(), a.to(dtype)) and torch.equal(b_view.cpu(), b.to(dtype))
    adapter_bytes = sum(x.numel() + y.numel() for x, y in weights.pairs.values()) * bank.pool.element_size()
    return {"ok": same and loads[-1]["slot_bytes_written"] == adapter_bytes and slot_bytes > 3 * adapter_bytes,
            "slot_mib": round(slot_bytes / 2**20, 2), "adapter_mib": round(adapter_bytes / 2**20, 2),
            "loads": loads, "load_ms": walls, "slot_holds_the_adapter": same,
            "whole_slot_mib_at_32_layers": round(slot_bytes / config.num_hidden_layers * 32 / 2**20, 1),
            "adapter_mib_at_32_layers": round(adapter_bytes / config.num_hidden_layers * 32 / 2**20, 1)}


def check_profile(model, tokenizer, names: list[str], device: torch.device, folders: list[Path], out_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from adapters.lora import BaseShape, load_lora
    from tests.support.harness import RunnerDriver

    driver = RunnerDriver.build(model, tokenizer, tokens=1024, context_window=64)
    shape = BaseShape.from_config(model.config)
    for name, folder in zip(names, folders):
        driver.runner.lora.add(name, load_lora(folder, shape))
    rows = {i: (PROMPTS[i % len(PROMPTS)], [names[0], names[1], None][i % 3]) for i in range(8)}
    driver.prefill(rows)
    tokens = {i: 5 for i in rows}
    for _ in range(3):
        driver.decode(tokens)  # warm-up
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(5):
            start = time.perf_counter()
            driver.decode(tokens)
            _sync(device)
            walls.append(time.perf_counter() - start)
    events = prof.key_averages()
    record = {"ok": True, "step_ms_median": round(statistics.median(walls) * 1000, 2)}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        record["kernels_per_step"] = round(len(kernels) / 5)
        record["device_ms_per_step"] = round(sum(e.device_time_total for e in kernels) / 5 / 1000, 2)
        sort = "device_time_total"
    else:
        record["operators_per_step"] = round(sum(e.count for e in events if e.key.startswith("aten::")) / 5)
        sort = "self_cpu_time_total"
    record["host_busy_ms_per_step"] = round(sum(e.self_cpu_time_total for e in events) / 5 / 1000, 2)
    (out_dir / "profile.txt").write_text(events.table(sort_by=sort, row_limit=25))
    return record


def check_peft(model, tokenizer, names: list[str], folders: list[Path], tolerance: float, base_folder: Path,
               dtype: torch.dtype) -> dict:
    """Rows on adapter a, b and none, interleaved in one prefill, against PEFT with each row's adapter
    set alone, on a fresh load of the same base: PEFT wrapping a bitsandbytes NF4 model that has already
    run a forward on CPU changes its base outputs (found here: bitsandbytes repacks CPU weights on the
    first forward, and the wrapped layers no longer read them right), so the reference must not be the
    model the runner used."""
    from peft import PeftModel

    from adapters.lora import BaseShape, load_lora
    from tests.support.harness import RunnerDriver

    driver = RunnerDriver.build(model, tokenizer, tokens=1024, context_window=64)
    shape = BaseShape.from_config(model.config)
    for name, folder in zip(names, folders):
        driver.runner.lora.add(name, load_lora(folder, shape))
    layout = [names[0], None, names[1], names[0], names[1], None]
    rows = {i: (PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate(layout)}
    with torch.no_grad():
        ours = driver.prefill(rows)
        reference, _ = load_nf4(base_folder, model.device, dtype)
        peft_model = PeftModel.from_pretrained(reference, str(folders[0]), adapter_name=names[0])
        peft_model.load_adapter(str(folders[1]), adapter_name=names[1])
        errors, effects = [], []
        try:
            for i, adapter in enumerate(layout):
                prompt = torch.tensor([rows[i][0]], device=reference.device)
                if adapter is None:
                    with peft_model.disable_adapter():
                        theirs = peft_model(prompt).logits[0, -1]
                else:
                    peft_model.set_adapter(adapter)
                    theirs = peft_model(prompt).logits[0, -1]
                errors.append(round(_rel(ours[i], theirs), 5))
                if adapter is not None:  # how far the adapter moves this row: the check must see more than its tolerance
                    with peft_model.disable_adapter():
                        effects.append(_rel(theirs, peft_model(prompt).logits[0, -1]))
        finally:
            del peft_model, reference
    # within tolerance of PEFT, and the error an order of magnitude below what the adapter changes (the first
    # GPU run asked the effect to be 10x the tolerance itself: a 24% effect with 1.7% error failed that)
    return {"ok": max(errors) < tolerance and max(errors) < min(effects) / 10, "adapter_effect_min": round(min(effects), 5),
            "relative_error_by_row": dict(zip(
        [f"{i}:{a or 'base'}" for i, a in enumerate(layout)], errors)), "tolerance": tolerance}


def check_lora_kernels(model, tokenizer, names: list[str], folders: list[Path], tolerance: float,
                       device: torch.device) -> dict:
    """The Triton shrink/expand kernels (lora_kernels: triton) against the torch path on the same rows:
    a mixed prefill's logits, then the median decode step of 8 and 64 interleaved rows both ways."""
    from adapters.lora import BaseShape, load_lora
    from tests.support.harness import RunnerDriver
    from server.engine.model_runner import ModelRunner

    try:
        from server.engine import lora_kernels
    except ImportError as exc:
        return {"ok": False, "error": f"triton not importable: {exc}"}
    shape = BaseShape.from_config(model.config)
    start = time.perf_counter()
    problem = lora_kernels.self_check(device, model.model.embed_tokens.weight.dtype, shape, 16)
    if problem is not None:
        return {"ok": False, "self_check": problem}
    self_check_s = round(time.perf_counter() - start, 2)  # the first call compiles every kernel variant
    drivers = {}
    for kernels in ("torch", "triton"):
        runner = ModelRunner(model, tokenizer, 64 * 4 + 1, 16, 64, 8, 16, lora_kernels=kernels)
        for name, folder in zip(names, folders):
            runner.lora.add(name, load_lora(folder, shape))
        drivers[kernels] = RunnerDriver(runner)
    layout = [names[0], None, names[1], names[0], names[1], None]
    rows = {i: (PROMPTS[i % len(PROMPTS)], adapter) for i, adapter in enumerate(layout)}
    with torch.no_grad():
        logits = {kernels: driver.prefill(rows) for kernels, driver in drivers.items()}
    error = _rel(logits["triton"], logits["torch"])
    record = {"ok": error < tolerance, "prefill_relative_error": round(error, 5), "tolerance": tolerance,
              "self_check_s": self_check_s}
    cuda = device.type == "cuda"  # without it Triton is interpreted (~100x slower): one small batch, 2 steps
    for batch in (8, 64) if cuda else (8,):
        rows = {i: ([5, 6, 7], [names[0], names[1], None][i % 3]) for i in range(batch)}
        for kernels, driver in drivers.items():
            driver.prefill(rows)
            tokens = {i: 5 for i in rows}
            for _ in range(3 if cuda else 1):
                driver.decode(tokens)
            walls = [_timed_decode(driver, tokens, device)[1] for _ in range(10 if cuda else 2)]
            record[f"decode_ms_batch{batch}_{kernels}"] = round(statistics.median(walls) * 1000, 2)
            for key in rows:
                driver.release(key)
    return record


def check_cuda_graphs(model, tokenizer, names: list[str], folders: list[Path], tolerance: float,
                      device: torch.device) -> dict:
    """Decode steps replayed from CUDA graphs (cuda_graphs: auto) against an eager runner on the same rows:
    8 rows over two adapters and the base, then 64; every step's logits compared, median step timed both
    ways. Without CUDA the static step runs eagerly (capture=False) on interpreted Triton, 8 rows only:
    a check of the script."""
    from adapters.lora import BaseShape, load_lora
    from tests.support.harness import RunnerDriver
    from server.engine.decode_graphs import DecodeGraphs
    from server.engine.model_runner import ModelRunner

    shape = BaseShape.from_config(model.config)
    drivers = {}
    cuda = device.type == "cuda"
    for mode in ("eager", "graphs"):
        kernels = "auto" if cuda or mode == "eager" else "triton"
        runner = ModelRunner(model, tokenizer, 64 * 4 + 1, 16, 64, 8, 16, lora_kernels=kernels,
                             cuda_graphs="auto" if mode == "graphs" else "off", max_batch_size=64)
        if mode == "graphs" and runner.graphs is None:
            runner.graphs = DecodeGraphs(runner, 64, capture=False)
        for name, folder in zip(names, folders):
            runner.lora.add(name, load_lora(folder, shape))
        drivers[mode] = RunnerDriver(runner)
    graphs = drivers["graphs"].runner.graphs
    record = {"captured": graphs.capture, "lora_kernels": drivers["graphs"].runner.lora.kernels,
              "shapes_at_start": len(graphs.shapes), "warm_up_s": round(graphs.warm_up_seconds, 2),
              "graph_mib": round(graphs.captured_bytes / 2**20, 1),
              "budget_mib": round((graphs.budget or 0) / 2**20, 1), "estimate_mib": round(graphs.estimate / 2**20, 1)}
    errors = []
    for batch in (8, 64) if cuda else (8,):
        rows = {i: ([5, 6, 7], [names[0], names[1], None][i % 3]) for i in range(batch)}
        walls = {}
        with torch.no_grad():
            for driver in drivers.values():
                driver.prefill(rows)
            tokens = {i: 5 for i in rows}
            for step in range(12 if cuda else 4):
                logits = {}
                for mode, driver in drivers.items():
                    logits[mode], seconds = _timed_decode(driver, tokens, device)
                    if step >= 2:  # past the capture and its check
                        walls.setdefault(mode, []).append(seconds)
                errors.append(_rel(logits["graphs"], logits["eager"]))
                tokens = {key: int(t) for key, t in zip(tokens, logits["eager"].argmax(-1))}
        for mode, times in walls.items():
            record[f"decode_ms_batch{batch}_{mode}"] = round(statistics.median(times) * 1000, 2)
        for driver in drivers.values():
            for key in rows:
                driver.release(key)
    record.update({"ok": not graphs.failed and max(errors) < tolerance and (graphs.replays > 0),
                   "disabled": {str(key): reason for key, reason in graphs.failed.items()},
                   "shapes": sorted(map(list, graphs.trusted)), "replays": graphs.replays,
                   "max_relative_error": round(max(errors), 5), "tolerance": tolerance})
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; for a check of the script use --shape tiny --device cpu")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    # bf16 keeps 8 bits of mantissa: relative errors near 1e-2 are its rounding, not a bug
    tolerance = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    meta = {**stamp("loadtests.gpu_smoke", argv), "shape": args.shape, "layers": args.layers, "dtype": str(dtype),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    smoke = Smoke(args.out_dir, meta)
    smoke.run("versions", check_versions, device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = llama_config(args.shape, args.layers, 256)
        save_random_base(config, work / "base", device)
        model, tokenizer = load_nf4(work / "base", device, dtype)
        smoke.log("base built and loaded NF4")
        folders = [write_random_adapter(config, work / f"expert{i}", 16, seed=i) for i in range(3)]
        names = [folder.name for folder in folders]
        # the NF4 kernels compute in bf16 on CPU whatever the compute dtype: a 1e-2 bound
        smoke.run("nf4_linear", check_nf4_linear, model, dtype, max(tolerance, 1e-2))
        smoke.run("runner", check_runner, model, tokenizer, tolerance, 12 if device.type == "cuda" else 4)
        smoke.run("engine", check_engine, model, tokenizer, folders, device)
        smoke.run("sampling", check_sampling, device)
        smoke.run("slots", check_slots, config, device, dtype)
        smoke.run("adapter_load", check_adapter_load, config, device, dtype, folders[0])
        smoke.run("profile", check_profile, model, tokenizer, names[:2], device, folders[:2], args.out_dir)
        smoke.run("peft", check_peft, model, tokenizer, names[:2], folders[:2], tolerance, work / "base", dtype)
        smoke.run("lora_kernels", check_lora_kernels, model, tokenizer, names[:2], folders[:2], tolerance, device)
        # decode steps compound float differences (the LoRA kernels sum in another order) through NF4 linears
        # that round their input to bf16: the bf16 bound
        smoke.run("cuda_graphs", check_cuda_graphs, model, tokenizer, names[:2], folders[:2], max(tolerance, 1e-2),
                  device)
    smoke.log("done")
    return 0 if all(record.get("ok") for record in smoke.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
