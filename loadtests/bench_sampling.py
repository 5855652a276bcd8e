"""What sampling one step costs: `sample_batch` over a batch of rows of the default model's vocabulary.

    python -m loadtests.bench_sampling [--batch 16] [--vocab 49152] [--repeat 20] [--generated 64]
                                       [--model-logits]

Random float32 logits, each row with its own seeded generator; the mean over --repeat calls of
greedy rows, rows sampled at temperature 1, rows sampled with temperature 0.8 and top_p 0.9, and greedy
rows with presence/frequency penalties over --generated tokens and a 5-token logit_bias (the
penalties' cost does not grow with it: the counts live on the device, sampling.new_token_counts).
Random normal logits are flat: every row's top_p nucleus holds thousands of tokens. --model-logits
takes the rows from the default model instead (the logits of each step of sampled answers to three
prompts, cycled to --batch rows) and prints how many rows' nuclei lie within each NUCLEUS_CANDIDATES
width of most likely tokens, which the CPU sampler cuts from without sorting the whole row.
Prints milliseconds per call (no result file: a quick check of the sampler next to a decode step,
whose times `python -m loadtests.bench_decode_step` gives).
"""
from __future__ import annotations

import argparse
import time

import torch

from server.engine.sampling import NUCLEUS_CANDIDATES, SamplingParams, make_generator, new_token_counts, sample_batch

PROMPTS = ["Write a short story about a dragon who learns to bake bread.", "List ten random words.",
           "Explain how a CPU cache works."]


def model_logits(rows: int) -> torch.Tensor:
    """Raw next-token logits of the default model along sampled answers (temperature 1, 60 tokens each)."""
    from models.base_model import EMBEDDED_BASE, load_base

    base = load_base(EMBEDDED_BASE, compute_dtype="float32")
    steps = []
    for prompt in PROMPTS:
        text = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = base.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = base.model.generate(ids, max_new_tokens=60, do_sample=True, temperature=1.0, top_k=0,
                                      output_logits=True, return_dict_in_generate=True)
        steps += [logits[0].float() for logits in out.logits]
    for temperature, top_p in ((0.8, 0.9), (1.0, 0.95)):
        for width in NUCLEUS_CANDIDATES:
            covered = sum(float(torch.topk(torch.softmax(row / temperature, -1), width).values.sum()) >= top_p
                          for row in steps)
            print(f"model rows at temperature {temperature}, top_p {top_p}: {covered} of {len(steps)} nuclei "
                  f"within the top {width} tokens")
    return torch.stack([steps[i % len(steps)] for i in range(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--generated", type=int, default=64, help="tokens each penalizing row has generated")
    parser.add_argument("--model-logits", action="store_true", help="the default model's logits, not random ones")
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = model_logits(args.batch) if args.model_logits else torch.randn(args.batch, args.vocab)
    args.vocab = logits.shape[-1]
    cases = {"greedy": SamplingParams(1, temperature=0.0), "temperature 1": SamplingParams(1, temperature=1.0),
             "temperature 0.8, top_p 0.9": SamplingParams(1, temperature=0.8, top_p=0.9),
             "temperature 1, top_p 0.95": SamplingParams(1, temperature=1.0, top_p=0.95)}
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
