"""One decode step of the model runner, timed: where the mixed-adapter cost of a batch goes.

    python -m loadtests.bench_decode_step [--batch 16] [--adapters 4] [--min-rows 4] [--profile interleaved]
                                          [--rank 16] [--single-thread-rows 4] [--wide-extra-rows 32] [--position 40]
                                          [--attention auto|kernel|torch] [--lora-kernels auto|torch|cpu]
    python -m loadtests.bench_decode_step --breakdown 1,16 [--adapters 3 --rank 8] [--out docs/decode-profile.json]

On the default model (NF4, float32 compute), with random rank-16 all-linear adapters, it
prefills --batch rows and times ModelRunner.decode (median of 30 steps, three alternated
rounds) for three layouts of the rows: no adapter; rows grouped by adapter; adapters interleaved
row by row (on the gather path: segments padded to --min-rows, 4 = the CPU batch-invariance
padding; 1 = none). --wide-extra-rows sets when a step takes the wide LoRA path (lora_batch). --profile LAYOUT prints the
torch profiler's op table for that layout. Last, the megabytes of weights a step reads: the base's and
each adapter's (what bounds a memory-bound step).

--breakdown BATCHES: where one decode step's time goes, at each batch size (rows interleaved over the
adapters, and on the base): the base's linears (quantized matmuls), LoRA, attention, lm_head and sampling
are timed by wrapping the functions that do them (no profiler: its own cost would swamp the small ops);
"other" is the rest of the step: embedding, norms, rotary, residual adds, and the Python that plans and
glues it. It runs on one thread and counts that thread's CPU time (time.thread_time), so a machine busier
than its cores (where wall time mostly measures waiting for a core) still gives what each part costs; the
median of the cheapest fifth of the steps is kept.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adapters.lora import LINEAR_MODULES, BaseShape, LoraWeights
from models.base_model import EMBEDDED_BASE, load_base
from server.engine import lora_batch
from server.engine.model_runner import ModelRunner, StepItem

RANK = 16


def random_adapter(shape: BaseShape, seed: int, rank: int = RANK) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(shape.num_layers):
        for module in LINEAR_MODULES:
            fan_in, fan_out = shape.linear_features[module]
            pairs[(layer, module)] = (torch.randn(fan_in, rank, generator=generator) / fan_in**0.5,
                                      torch.randn(rank, fan_out, generator=generator) * 0.005)
    return LoraWeights(rank, pairs, LINEAR_MODULES, None)


def weight_bytes(model, shape: BaseShape, rank: int) -> dict[str, float]:
    """MB of weights a decode step reads: the base's linears as stored (NF4 packed + their absmax), the
    lm_head, and one adapter's A and B at `rank` in the compute dtype (all seven linears, as here). What
    bounds a step when it is memory-bound: an adapter costs its share of these bytes whatever is done."""
    layers = model.model.layers
    linears = sum(p.numel() * p.element_size() for layer in layers
                  for name, p in [*layer.named_parameters(), *layer.named_buffers()] if "proj" in name)
    linears += sum(getattr(m.weight, "quant_state", None).absmax.numel() * 4 for layer in layers
                   for m in layer.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None)
    head = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    adapter = sum((fan_in + fan_out) * rank for fan_in, fan_out in (shape.linear_features[m] for m in LINEAR_MODULES))
    adapter *= shape.num_layers * model.model.norm.weight.element_size()
    return {"base_linears": linears / 1e6, "lm_head": sum(head.values()) / 1e6, "adapter": adapter / 1e6}


def time_steps(runner: ModelRunner, tables: list[list[int]], adapters: list, steps: int, position: int = 40) -> float:
    """Median milliseconds of one decode step (the prefilled cache is reused: `position` every time)."""
    times = []
    items = [StepItem([5], position, table, adapter) for table, adapter in zip(tables, adapters)]
    for _ in range(steps):
        start = time.perf_counter()
        runner.step(items)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


class _Clock:
    """Wall time spent inside wrapped functions, by category (outermost call only)."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self._depth = 0

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[category] = self.spent.get(category, 0.0) + time.thread_time() - start
                self._depth -= 1
        return timed


def breakdown(runner: ModelRunner, tables: list[list[int]], batches: list[int], names: list[str],
              steps: int = 40, position: int = 40) -> list[dict]:
    """Per batch size and layout: ms of each category in the fastest steps (see the module's docstring)."""
    from server.engine import sampling
    from server.engine.lora_batch import KernelStepLora, StepLora

    clock = _Clock()
    linears = [m for layer in runner.layers for name, m in layer.named_modules() if name.endswith("_proj")]
    patched = []

    def patch(owner, attr, category):
        original = getattr(owner, attr)
        patched.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, clock.wrap(category, original))

    for module in {id(m): m for m in linears}.values():
        patch(module, "forward", "base matmuls")
    for name in ("fused_linear", "quantized_linear"):  # the fused/quantized paths, where the runner has them
        if hasattr(runner, name):
            patch(runner, name, "base matmuls")
    patch(StepLora, "apply", "LoRA")
    patch(KernelStepLora, "apply", "LoRA")
    patch(runner, "_attention", "attention")
    patch(runner, "_logits", "lm_head")
    greedy = sampling.SamplingParams(max_tokens=1, temperature=0.0)
    rows = []
    try:
        for batch in batches:
            for layout, adapters in (("base", [None] * batch),
                                     ("experts", [names[i % len(names)] for i in range(batch)])):
                items = [StepItem([5], position, table, adapter) for table, adapter in zip(tables[:batch], adapters)]
                samples = []
                for _ in range(steps):
                    clock.spent = {}
                    start = time.thread_time()
                    logits = runner.step(items)
                    sample_start = time.thread_time()
                    sampling.sample_batch(logits, [greedy] * batch, [None] * batch)
                    end = time.thread_time()
                    spent = dict(clock.spent)
                    spent["sampling"] = end - sample_start
                    spent["total"] = end - start
                    samples.append(spent)
                samples.sort(key=lambda s: s["total"])
                best = samples[: max(3, steps // 5)]  # the fastest fifth: what the step costs undisturbed
                row = {"batch": batch, "layout": layout}
                for key in ("base matmuls", "LoRA", "attention", "lm_head", "sampling", "total"):
                    row[key] = statistics.median(s.get(key, 0.0) for s in best) * 1000
                row["other"] = row["total"] - sum(row[k] for k in ("base matmuls", "LoRA", "attention", "lm_head",
                                                                  "sampling"))
                rows.append(row)
                print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
    finally:
        for owner, attr, original, own in reversed(patched):
            if own or isinstance(owner, type):
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # an instance's bound method: the class's is found again
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--min-rows", type=int, default=None, help="LoRA segment padding (default: the bank's)")
    parser.add_argument("--profile", choices=("none", "grouped", "interleaved"), default=None)
    parser.add_argument("--rank", type=int, default=RANK, help="the adapters' rank (the demo experts: 8)")
    parser.add_argument("--single-thread-rows", type=int, default=None,
                        help="lora_batch.SINGLE_THREAD_ROWS (0: LoRA matmuls always on every thread)")
    parser.add_argument("--wide-extra-rows", type=int, default=None,
                        help="lora_batch.WIDE_EXTRA_ROWS (-1: the gather path for every step without a mixture)")
    parser.add_argument("--breakdown", default=None, help="comma-separated batch sizes: time per category")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a machine busier than its cores: every op "
                             "of a multi-threaded step then waits at an OpenMP barrier for a descheduled thread")
    parser.add_argument("--lora-kernels", choices=("auto", "torch", "cpu"), default="auto",
                        help="the runner's lora_kernels (auto: as `loraplex serve` on this machine)")
    parser.add_argument("--attention", choices=("auto", "kernel", "torch"), default="auto",
                        help="the runner's attention setting (cpu_attention.py)")
    parser.add_argument("--position", type=int, default=40,
                        help="the position every row decodes at (its keys: this many cached tokens); a 128-token "
                             "answer to a short chat prompt decodes at 40-170")
    parser.add_argument("--out", default=None, help="--breakdown: write the rows (and the machine) here as JSON")
    args = parser.parse_args()
    if args.single_thread_rows is not None:
        lora_batch.SINGLE_THREAD_ROWS = args.single_thread_rows
    if args.wide_extra_rows is not None:
        lora_batch.WIDE_EXTRA_ROWS = args.wide_extra_rows
    if args.breakdown:
        args.threads = 1  # see --breakdown
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_base(EMBEDDED_BASE, compute_dtype="float32")
    block_size = 16
    if args.breakdown:
        args.batch = max(int(b) for b in args.breakdown.split(","))
    width = args.position // block_size + 1  # blocks per row: the prefilled positions and the decoded one
    runner = ModelRunner(base.model, base.tokenizer, args.batch * width + 1, block_size,
                         max(256, width * block_size), adapter_slots=max(8, args.adapters),
                         max_adapter_rank=max(RANK, args.rank), lora_kernels=args.lora_kernels,
                         attention=args.attention)
    tables = [[1 + width * i + j for j in range(width)] for i in range(args.batch)]
    shape = BaseShape.from_config(base.model.config)
    names = [f"e{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        runner.lora.add(name, random_adapter(shape, i, args.rank))
    if args.min_rows is not None:
        runner.lora.min_rows = args.min_rows
    runner.step([StepItem([100 + i % 400 for i in range(args.position)], 0, table, None) for table in tables])
    if args.breakdown:
        batches = [int(b) for b in args.breakdown.split(",")]
        breakdown(runner, tables, batches, names, steps=10, position=args.position)  # warm-up
        rows = breakdown(runner, tables, batches, names, position=args.position)
        if args.out:
            import json
            import os

            from loadtests.provenance import stamp

            record = {**stamp("loadtests.bench_decode_step"), "threads": torch.get_num_threads(),
                      "load_average": [round(x, 2) for x in os.getloadavg()], "adapters": args.adapters,
                      "rank": args.rank, "position": args.position,
                      "attention": "kernel" if runner.attention_kernel is not None else "torch",
                      "lora_kernels": runner.lora.kernels, "rows": rows}
            with open(args.out, "w") as handle:
                json.dump(record, handle, indent=2)
        return
    layouts = {
        "none": [None] * args.batch,
        "grouped": [names[i * len(names) // args.batch] for i in range(args.batch)],
        "interleaved": [names[i % len(names)] for i in range(args.batch)],
    }
    for adapters in layouts.values():  # warm-up: kernels, the stacked adapter sets
        time_steps(runner, tables, adapters, 5, args.position)
    results = {name: [] for name in layouts}
    for _ in range(3):  # alternated rounds: this machine's speed drifts
        for name, adapters in layouts.items():
            results[name].append(time_steps(runner, tables, adapters, 30, args.position))
    for name, runs in results.items():
        print(f"batch {args.batch}, {name}: {statistics.median(runs):.2f} ms per decode step")
    sizes = weight_bytes(base.model, shape, args.rank)
    print(f"weights read per step: base linears {sizes['base_linears']:.0f} MB + lm_head {sizes['lm_head']:.0f} MB; "
          f"each rank-{args.rank} adapter {sizes['adapter']:.1f} MB ({args.adapters} adapters: "
          f"{args.adapters * sizes['adapter']:.0f} MB, {args.adapters * sizes['adapter'] / (sizes['base_linears'] + sizes['lm_head']):.0%} "
          f"of the base's)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(runner, tables, layouts[args.profile], 10, args.position)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
