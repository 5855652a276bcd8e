"""What sampling one step costs: `sample_batch` over a batch of rows of the default model's vocabulary.

    python -m loadtests.bench_sampling [--batch 16] [--vocab 49152] [--repeat 20] [--generated 64]

Random float32 logits, each row with its own seeded generator; the mean over --repeat calls of
greedy rows, rows sampled at temperature 1, rows sampled with temperature 0.8 and top_p 0.9, and greedy
rows with presence/frequency penalties over --generated tokens and a 5-token logit_bias (the
penalties' cost does not grow with it: the counts live on the device, sampling.new_token_counts).
Prints milliseconds per call (no result file: a quick check of the sampler next to a decode step,
whose times `python -m loadtests.bench_decode_step` gives).
"""
from __future__ import annotations

import argparse
import time
import torch

from server.engine.sampling import SamplingParams, make_generator, new_token_counts, sample_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--generated", type=int, default=64, help="tokens each penalizing row has generated")
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab)
    cases = {"greedy": SamplingParams(1, temperature=0.0), "temperature 1": SamplingParams(1, temperature=1.0),
             "temperature 0.8, top_p 0.9": SamplingParams(1, temperature=0.8, top_p=0.9)}
    # greedy with OpenAI's penalties over --generated tokens and a 5-token logit_bias on every row
    cases["greedy, penalties + logit_bias"] = SamplingParams(1, temperature=0.0, presence_penalty=0.5,
                                                             frequency_penalty=0.3, logit_bias={i: 2.0 for i in range(5)})
    counts = [new_token_counts(logits) for _ in range(args.batch)]  # as the engine keeps them
    for row, row_counts in enumerate(counts):
        generated = torch.randint(0, args.vocab, (args.generated,), generator=torch.Generator().manual_seed(row))
        row_counts.index_put_((generated,), torch.ones(args.generated), accumulate=True)
    for label, params in cases.items():
        generators = [make_generator(i, torch.device("cpu")) for i in range(args.batch)]
        generated = counts if params.penalizes else None
        sample_batch(logits, [params] * args.batch, generators, generated)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeat):
            sample_batch(logits, [params] * args.batch, generators, generated)
        elapsed = (time.perf_counter() - start) / args.repeat * 1000
        print(f"batch {args.batch}, vocab {args.vocab}, {label}: {elapsed:.1f} ms per step")


if __name__ == "__main__":
    main()
