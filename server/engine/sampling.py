"""Per-request sampling: greedy for temperature 0, else temperature + nucleus (top_p).

Each request owns its torch.Generator, so a seeded request draws the same tokens whatever
else shares its batch. Presence/frequency penalties and logit_bias adjust a row's logits
before it is sampled (a penalizing request counts its generated tokens in a vocabulary-sized
tensor on the device, updated by the step that samples them, so the host sends a few numbers
per row however long the answer has grown); logprobs report the model's own distribution
(before temperature, penalties and bias, as vLLM does), so they say what the model thought,
not what we did.

Every legal value is served and no row can take the others down: a temperature too small to
divide by is greedy (as in vLLM), the most likely token always survives top_p, non-finite
logits (a broken adapter, an overflow) are masked out before anything samples from them, and
a row that cannot be sampled is reported as that row's error, not raised for the batch.

A step's rows are sampled together: per-row temperatures and top_p values become tensors, greedy
rows share one argmax, sampled rows one softmax, one top_p cut (`_nucleus`) and one running sum
searched at a uniform number per row, and the tokens come back to the host in one transfer (what a
GPU needs: no per-row synchronisation). The logit_bias of every row is one scattered add; a
penalizing row gets two small in-place ops and one add to its counts, a row with a grammar its own
matcher.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from server.engine.transfer import to_device

# On a CPU a row's top_p nucleus is looked for among its 256, then 2048 most likely tokens before a full
# sort of the row (see _nucleus)
NUCLEUS_CANDIDATES = (256, 2048)
# The draw's running sums go over blocks of this many tokens, then inside one (see _inverse_cdf)
CDF_BLOCK = 256
# Below this a temperature is greedy: logits / 1e-300 is inf (or 0/0 = NaN) in float32, and the
# distribution such a temperature asks for is the argmax to within float precision anyway.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    # free text ends once its last this-many tokens or more repeat one block, a constrained answer is steered
    # off (loops.py); 0: never. Set at the edge from the `loop_stop_tokens` setting, 0 with ignore_eos
    loop_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the `top` most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator; seeds are taken modulo 2**64, as torch itself does for negative ones."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(63))
    return generator


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


@dataclass
class Sampled:
    """One step's draw: a token per row (None where the row failed), logprobs where asked,
    the rows whose logits held non-finite values (masked), and each failed row's reason."""

    tokens: list[int | None]
    logprobs: list[TokenLogprob | None]
    masked: list[int]
    errors: dict[int, str]


def new_token_counts(logits: torch.Tensor) -> torch.Tensor:
    """A penalizing request's generated-token counts: one float32 per vocabulary entry, on the logits'
    device (exact up to 2**24 tokens). `sample_batch` adds each step's token to it there."""
    return torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)


def _penalize(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> None:
    """OpenAI's presence/frequency penalties on one row of logits, in place, from the row's counts: minus
    count x frequency_penalty, and minus presence_penalty once for every token generated at all (counts
    are >= 0, so their sign says that). Row by row in place rather than over the stacked rows: no
    [rows, vocab] temporaries, which on a CPU cost more in fresh pages than the arithmetic; the penalties
    are host numbers handed to the kernels, so nothing is copied to the device."""
    if params.frequency_penalty:
        logits.add_(counts, alpha=-params.frequency_penalty)
    if params.presence_penalty:
        logits.add_(counts.sign(), alpha=-params.presence_penalty)


def adjust_rows(logits: torch.Tensor, params: list[SamplingParams], token_counts, constraints,
                errors: dict[int, str]) -> torch.Tensor:
    """The logits rows are sampled from: grammar masks on the rows that have one (row by row: each is its
    own matcher), then the penalties of every penalizing row from its token counts (two small ops per
    row, `_penalize`), then every row's logit_bias in one scattered add (one host -> device copy of
    (row, token, bias) triples and one kernel, however many rows ask). A copy; rows with nothing to
    adjust are untouched. A row whose adjustment fails gets an error, the batch goes on."""
    adjusted = None
    rows, tokens, deltas = [], [], []
    penalized: list[int] = []
    vocab = logits.shape[-1]
    for row, row_params in enumerate(params):
        constrain = constraints[row] if constraints else None
        if constrain is not None:  # a grammar: tokens it does not allow next become -inf
            if adjusted is None:
                adjusted = logits.clone()
            try:
                values = constrain(adjusted[row].clone())
                if not torch.isfinite(values).any():
                    raise ValueError("the output format allows no token the model can produce here")
                adjusted[row] = values
            except Exception as exc:  # this row's fault; the batch goes on
                errors[row] = f"sampling failed: {exc}"
                continue
        bias = row_params.logit_bias or {}
        if any(not 0 <= token < vocab for token in bias):  # checked at the edge; never index past it
            errors[row] = f"sampling failed: a token id of this request is outside the vocabulary of {vocab}"
            continue
        if row_params.penalizes and token_counts and token_counts[row] is not None:
            penalized.append(row)
        for token, delta in bias.items():
            rows.append(row)
            tokens.append(token)
            deltas.append(delta)
    if penalized or rows:
        if adjusted is None:
            adjusted = logits.clone()
        device = adjusted.device
    for row in penalized:
        _penalize(adjusted[row], token_counts[row], params[row])
    if rows:
        index = to_device([rows, tokens], device).unbind()
        adjusted.index_put_(index, to_device(deltas, device, adjusted.dtype), accumulate=True)
    return logits if adjusted is None else adjusted


def _count_tokens(tokens: torch.Tensor, token_counts) -> None:
    """Add each penalizing row's new token to its counts, on the device (no host read of the token)."""
    for row, counts in enumerate(token_counts or ()):
        if counts is not None:
            counts.index_put_((tokens[row : row + 1],), counts.new_ones(1), accumulate=True)


def _cut(width: int, values: torch.Tensor, ids: torch.Tensor, running: torch.Tensor,
         limit: torch.Tensor) -> torch.Tensor:
    """[rows, width] probabilities from each row's ranked `values` (descending, at `ids`, with their
    running sum): a value is kept while the mass ranked before it is under the row's limit; the first
    always is."""
    outside = (running - values) >= limit
    outside[:, 0] = False
    return values.new_zeros(values.shape[0], width).scatter_(1, ids, values.masked_fill(outside, 0.0))


def _nucleus(probs: torch.Tensor, cut: list[int], top_ps: list[float]) -> torch.Tensor:
    """`probs` with each of the `cut` rows kept to its nucleus: the smallest set of most likely tokens
    whose mass reaches its top_p (the most likely token always stays, also for a top_p that float32
    rounds to 0, 5e-324); the other rows as they are.

    That set needs the row's probabilities in order. On a CPU a full sort of a large vocabulary costs
    many times more than finding its 256 or 2048 most likely tokens (README, Performance: Sampled
    requests): a row whose
    candidates already reach its top_p (by the same running sum the cut uses, so every other token would
    be cut anyway) is cut from them; the others try the next NUCLEUS_CANDIDATES width, and what is left
    is sorted whole (`python -m loadtests.bench_sampling --model-logits` counts the default model's rows
    each width covers). A host read decides, free on a CPU; an accelerator sorts every row whole, fast
    there, rather than wait for one."""
    device, vocab = probs.device, probs.shape[-1]
    index = None if len(cut) == probs.shape[0] else to_device(cut, device)
    rows = probs if index is None else probs.index_select(0, index)
    limit = to_device(top_ps, device, probs.dtype)[:, None]
    widths = [width for width in NUCLEUS_CANDIDATES if width < vocab] if device.type == "cpu" else []
    kept, short = None, None  # short: the rows (of `rows`) whose nuclei are not cut yet; None: all
    for width in (*widths, vocab):
        part, part_limit = ((rows, limit) if short is None
                            else (rows.index_select(0, short), limit.index_select(0, short)))
        values, ids = (torch.topk(part, width, dim=-1) if width < vocab
                       else torch.sort(part, dim=-1, descending=True))
        running = values.cumsum(-1)
        part_kept = _cut(vocab, values, ids, running, part_limit)
        if kept is None:
            kept = part_kept
        else:
            kept.index_copy_(0, short, part_kept)
        if width == vocab:
            break
        beyond = (running[:, -1:] < part_limit).flatten().nonzero().flatten()
        if not len(beyond):
            break
        short = beyond if short is None else short.index_select(0, beyond)
    return kept if index is None else probs.index_copy(0, index, kept)


def _below(total: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, kept strictly below `total` (a uniform of 1, or a sum rounded the other way, would reach
    it)."""
    return torch.minimum(value, torch.nextafter(total, torch.zeros_like(total)))


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose running sum of probabilities exceeds uniform x the row's total
    (token i with probability p_i / total), found in two levels: the running sum of the row's blocks of
    CDF_BLOCK tokens picks a block, the running sum inside that block the token. The running sums are
    float64, so a token of tiny probability late in a large vocabulary keeps its share; no [rows, vocab]
    temporary is made (a float64 running sum of whole rows is a multi-megabyte temporary per step, which
    on a CPU costs fresh pages every step; the block sums are one float32 read). Each target stays below its total (the row's, then the
    block's own running sum, which its float32 sum may exceed by a rounding), also for a uniform of 1
    (curand's range is (0, 1]; torch maps its 1 to 0 today, which this does not rely on), so the block
    and the token found always have probability > 0: a token cut by top_p, a grammar or a -100 bias is
    never drawn. A row of NaN (it fails anyway) finds some index in range, never an error."""
    rows, vocab = probs.shape
    pad = -vocab % CDF_BLOCK
    blocked = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(rows, -1, CDF_BLOCK)
    block_running = blocked.sum(-1).double().cumsum(-1)  # [rows, blocks]; a block's own sum in float32
    total = block_running[:, -1:]
    target = _below(total, uniforms * total)
    block = torch.searchsorted(block_running, target, right=True).clamp_(max=blocked.shape[1] - 1)
    before = torch.where(block > 0, block_running.gather(1, (block - 1).clamp_(min=0)), 0.0)
    inside = blocked.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK))[:, 0].cumsum(-1, dtype=torch.float64)
    offset = _below(inside[:, -1:], target - before)
    token = torch.searchsorted(inside, offset, right=True).clamp_(max=CDF_BLOCK - 1) + block * CDF_BLOCK
    return token.clamp_(max=vocab - 1)[:, 0]


def _draw(source: torch.Tensor, rows: list[int], params: list[SamplingParams],
          generators: list[torch.Generator]) -> torch.Tensor:
    """One token for each of `rows` (temperature, then top_p), all rows in a few batched ops.

    The draw inverts each row's distribution at one uniform number from the row's own generator
    (`_inverse_cdf`), so a seeded request draws the same tokens whatever shares its batch. One random
    number a row, not one per vocabulary entry (an exponential race draws one per entry, which torch
    does element by element on a CPU; `bench_sampling --model-logits` compares them); no host sync, and
    no op that can hit the device-side assert torch.multinomial raises on NaN probabilities (it would
    poison a CUDA context)."""
    device = source.device
    if len(rows) == source.shape[0]:
        logits = source  # every row samples: no gather
    else:
        logits = source.index_select(0, to_device(rows, device))
    temperatures = to_device([params[r].temperature for r in rows], device, logits.dtype)
    probs = torch.softmax(logits / temperatures[:, None], dim=-1)
    top_ps = [params[r].top_p for r in rows]
    cut = [i for i, top_p in enumerate(top_ps) if top_p < 1.0]
    if cut:
        probs = _nucleus(probs, cut, [top_ps[i] for i in cut])
    uniforms = torch.empty(len(rows), 1, dtype=torch.float64, device=device)
    for i, row in enumerate(rows):  # each row's own generator
        uniforms[i].uniform_(generator=generators[row])
    return _inverse_cdf(probs, uniforms)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams],
              rows: list[int]) -> list[TokenLogprob]:
    """The model's own log-probabilities (before temperature, penalties and bias) of each row's token
    and its top alternatives, computed for all rows at once and read back in one transfer."""
    index = to_device(rows, logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    top = max(params[r].top_logprobs for r in rows)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:, :0], logprobs[:, :0].long())
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    out = []
    for i, row in enumerate(rows):
        k = params[row].top_logprobs
        out.append(TokenLogprob(-1, chosen[i], list(zip(ids[i][:k], values[i][:k]))))
    return out


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 token_counts: list[torch.Tensor | None] | None = None, constraints: list | None = None) -> Sampled:
    """One token per row, and its logprob for rows that asked.

    Per-row settings become batched tensor ops: greedy rows take one shared argmax, sampled rows are
    drawn together (`_draw`), and the step's tokens, with which rows held non-finite logits, come back
    to the host in one transfer (logprobs, when asked, in one more). `constraints[row]`, when given,
    masks that row's logits to what its output format allows (structured outputs); rows without one
    are not touched. `token_counts[row]`, a penalizing row's `new_token_counts`, drives its penalties
    and gets the row's new token added (a row that fails is counted too: it ends). A row whose logits
    are all non-finite, or whose adjustment fails, gets an error instead of a token; the other rows are
    sampled as if it were not there.
    """
    # NaN/inf are never sampled. On a CPU a host read costs nothing, so the usual step (every value finite)
    # is told by its row sums, finite only if every value is (one reduction, far cheaper than the
    # elementwise check), and skips the check and the masking copy; an overflowing sum
    # only sends the step to the full check. On an accelerator both are always made, never waited for.
    if logits.device.type == "cpu" and bool(torch.isfinite(logits.sum(dim=-1)).all()):
        flags = torch.zeros(2, logits.shape[0], dtype=torch.bool)
    else:
        finite = torch.isfinite(logits)
        flags = torch.stack((~finite.all(dim=-1), ~finite.any(dim=-1)))  # [some bad, none left] per row
        if logits.device.type != "cpu" or bool(flags[0].any()):
            logits = logits.masked_fill(~finite, float("-inf"))
    errors: dict[int, str] = {}
    source = adjust_rows(logits, params, token_counts, constraints, errors)
    tokens = source.argmax(dim=-1)
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy and row not in errors]
    if sampled_rows:
        drawn = _draw(source, sampled_rows, params, generators)
        tokens = tokens.index_copy(0, to_device(sampled_rows, tokens.device), drawn)
    _count_tokens(tokens, token_counts)
    packed = torch.cat((tokens[None], flags.long())).tolist()  # the one device -> host transfer
    token_list, some_bad, none_left = packed
    result = Sampled([None] * len(params), [None] * len(params), [r for r, bad in enumerate(some_bad) if bad], errors)
    for row, empty in enumerate(none_left):
        if empty:
            errors[row] = "the model produced no finite logits for this request"
    wanted = [row for row, p in enumerate(params) if p.logprobs and row not in errors]
    if wanted:
        for row, logprob in zip(wanted, _logprobs(logits, tokens, params, wanted)):
            logprob.token_id = token_list[row]
            result.logprobs[row] = logprob
    for row in range(len(params)):
        if row not in errors:
            result.tokens[row] = token_list[row]
    return result
