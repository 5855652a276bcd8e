"""Penalties, logit_bias and logprobs on known logits; token bytes for byte-level and SentencePiece vocabularies."""
import pytest
import torch

from server.api.logprobs import LOWEST_LOGPROB, TokenPieces
from server.engine.sampling import (SamplingParams, TokenLogprob, adjust_rows, make_generator, new_token_counts,
                                    sample_batch)


def counts_of(vocab: int, counts: dict[int, int]) -> torch.Tensor:
    """A request's token counts as the engine keeps them (sampling.new_token_counts), filled in."""
    tensor = new_token_counts(torch.zeros(1, vocab))
    for token, count in counts.items():
        tensor[token] = count
    return tensor


def test_penalties_and_bias_follow_openai_formula_row_by_row():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3)
    params = [SamplingParams(max_tokens=4, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={0: 10.0}),
              SamplingParams(max_tokens=4),  # nothing to adjust
              SamplingParams(max_tokens=4, frequency_penalty=1.0, logit_bias={3: -1.0, 2: 0.5})]
    errors = {}
    counts = [counts_of(4, {3: 2, 1: 1}), None, counts_of(4, {3: 1})]
    adjusted = adjust_rows(logits, params, counts, None, errors)
    # row 0, token 3: 4 - 2 * 0.25 - 0.5; token 1: 2 - 0.25 - 0.5; token 0: + bias; untouched otherwise
    assert adjusted[0].tolist() == [11.0, 1.25, 3.0, 3.0]
    assert adjusted[1].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert adjusted[2].tolist() == [1.0, 2.0, 3.5, 2.0]  # token 3: penalty and bias both apply
    assert logits.tolist() == [[1.0, 2.0, 3.0, 4.0]] * 3 and not errors  # the batch's logits are not modified


def test_greedy_rows_with_bias_or_penalty_pick_the_adjusted_argmax():
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    params = [SamplingParams(4, temperature=0.0), SamplingParams(4, temperature=0.0, logit_bias={1: -100.0}),
              SamplingParams(4, temperature=0.0, frequency_penalty=2.0)]
    generators = [make_generator(0, torch.device("cpu")) for _ in params]
    counts = counts_of(3, {1: 1})
    sampled = sample_batch(logits, params, generators, [None, None, counts])
    assert sampled.tokens == [1, 2, 2] and sampled.logprobs == [None, None, None] and not sampled.errors
    assert counts.tolist() == [0.0, 1.0, 1.0]  # the step counted the token it sampled


def test_penalties_build_up_from_the_tokens_each_step_samples():
    """Greedy over fixed logits with a frequency penalty of 1 and a presence penalty of 0.5: the counts the
    steps keep on the device make the row leave a token once its penalty outweighs its lead, as counting
    on the host and applying OpenAI's formula by hand says; a row without penalties keeps its argmax."""
    logits = torch.tensor([[3.0, 2.0, 0.0, -5.0]] * 2)
    params = [SamplingParams(8, temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5),
              SamplingParams(8, temperature=0.0)]
    generators = [make_generator(0, torch.device("cpu")) for _ in params]
    counts = new_token_counts(logits)
    expected, host = [], {}
    for _ in range(8):
        scores = [logits[0, t].item() - (host.get(t, 0) * 1.0 + (0.5 if host.get(t) else 0.0)) for t in range(4)]
        best = max(range(4), key=lambda t: (scores[t], -t))
        expected.append(best)
        host[best] = host.get(best, 0) + 1
        sampled = sample_batch(logits, params, generators, [counts, None])
        assert sampled.tokens[1] == 0
        assert sampled.tokens[0] == best
    assert len(set(expected)) == 3  # the penalty really moved the row, to token 2 in the end
    assert counts.tolist() == [float(host.get(t, 0)) for t in range(4)]


def test_logprobs_report_the_model_distribution_with_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(4, temperature=0.0, logprobs=True, top_logprobs=2, logit_bias={3: 100.0})]
    sampled = sample_batch(logits, params, [make_generator(0, torch.device("cpu"))])
    (logprob,) = sampled.logprobs
    expected = torch.log_softmax(logits[0], dim=-1)
    assert sampled.tokens == [3]  # the bias decided the token...
    assert logprob.logprob == pytest.approx(float(expected[3]))  # ...but the logprob is the model's own
    assert [token for token, _ in logprob.top] == [0, 1]
    assert [value for _, value in logprob.top] == pytest.approx(expected[:2].tolist())


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    # a runner-up only 1e-3 below the best: any real sampling at temperature 1 would pick it often
    logits = torch.tensor([[0.0, 3.0, 2.999, -1.0]] * 64)
    params = [SamplingParams(4, temperature=temperature) for _ in range(64)]
    sampled = sample_batch(logits, params, [make_generator(i, torch.device("cpu")) for i in range(64)])
    assert sampled.tokens == [1] * 64 and not sampled.errors


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.tensor([[0.0, 1.0, 0.5, -1.0]] * 32)
    params = [SamplingParams(4, temperature=1.0, top_p=top_p) for _ in range(32)]
    sampled = sample_batch(logits, params, [make_generator(i, torch.device("cpu")) for i in range(32)])
    assert sampled.tokens == [1] * 32 and not sampled.errors


def test_non_finite_logits_are_masked_and_a_row_with_none_left_fails_alone():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5],  # healthy
                           [nan, 1.0, inf, 0.5],  # some bad values: masked, the finite best wins
                           [nan, nan, -inf, inf],  # nothing finite: this row fails
                           [3.0, nan, 1.0, 0.0]])
    params = [SamplingParams(4, temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(4, temperature=1.0, logprobs=True, top_logprobs=3),
              SamplingParams(4, temperature=1.0), SamplingParams(4, temperature=0.0, top_p=0.5)]
    sampled = sample_batch(logits, params, [make_generator(i, torch.device("cpu")) for i in range(4)])
    assert sampled.masked == [1, 2, 3]
    assert set(sampled.errors) == {2} and "no finite logits" in sampled.errors[2]
    assert sampled.tokens[0] == 2 and sampled.tokens[1] in (1, 3) and sampled.tokens[2] is None
    assert sampled.tokens[3] == 0
    for logprob in sampled.logprobs[:2]:  # JSON-safe numbers only (no NaN, no inf)
        values = [logprob.logprob] + [value for _, value in logprob.top]
        assert all(value == value and value != inf for value in values)


def test_a_row_whose_sampling_raises_fails_alone():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    params = [SamplingParams(4, temperature=0.0), SamplingParams(4, temperature=0.0, logit_bias={7: 1.0})]  # 7: outside
    sampled = sample_batch(logits, params, [make_generator(i, torch.device("cpu")) for i in range(2)])
    assert sampled.tokens == [2, None] and set(sampled.errors) == {1}


def test_token_bytes_rebuild_text_split_inside_a_character(tokenizer):
    pieces = TokenPieces(tokenizer)
    text = "Ahoy café 😀 ünïcödé"
    ids = tokenizer.encode(text)
    assert b"".join(pieces.token_bytes(i) for i in ids).decode() == text
    entry = pieces.entry(TokenLogprob(ids[0], float("-inf"), [(ids[1], -1.5)]))
    assert entry["logprob"] == LOWEST_LOGPROB and entry["top_logprobs"][0]["logprob"] == -1.5
    assert entry["bytes"] == list(pieces.token_bytes(ids[0]))


class _SentencePieceLike:
    """Tokens as SentencePiece writes them: U+2581 for spaces, <0xNN> for raw bytes."""

    vocab = ["\u2581Hello", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!"]

    def convert_ids_to_tokens(self, token_id):
        return self.vocab[token_id]


def test_token_bytes_for_sentencepiece_vocabularies():
    pieces = TokenPieces(_SentencePieceLike())
    assert b"".join(pieces.token_bytes(i) for i in range(6)).decode() == " Hello😀!"
    assert pieces.entry(TokenLogprob(1, -0.1, []))["token"] == "\ufffd"  # a lone byte of a 4-byte character


def test_batched_draws_follow_the_distribution_and_top_p():
    """The draw picks token i with probability p_i; top_p cuts the tail first."""
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(1, temperature=1.0)] * 2000 + [SamplingParams(1, temperature=1.0, top_p=0.8)] * 2000
    sampled = sample_batch(logits, params, [make_generator(i, torch.device("cpu")) for i in range(4000)])
    free = torch.bincount(torch.tensor(sampled.tokens[:2000]), minlength=4).float() / 2000
    assert torch.allclose(free, probs, atol=0.035), free
    cut = torch.bincount(torch.tensor(sampled.tokens[2000:]), minlength=4).float() / 2000
    assert cut[2] == cut[3] == 0  # outside the top 0.85 of the mass
    assert abs(cut[0] - 0.6 / 0.85) < 0.035, cut


def test_the_nucleus_from_the_top_candidates_is_the_one_a_full_sort_gives():
    """On a CPU a row's nucleus is cut from its 256, else 2048 most likely tokens when they reach its
    top_p, else from a full sort; the kept probabilities are exactly those of the full sort's cut, row by
    row, in a batch holding all three kinds (peaked rows; rows whose mass sits on ~2000 tokens; flat
    rows). Rows with top_p 1 are left as they are."""
    from server.engine.sampling import NUCLEUS_CANDIDATES, _nucleus

    torch.manual_seed(0)
    vocab = 4096
    peaked = torch.randn(vocab) * 4
    spread = torch.cat((torch.full((2000,), 4.0), torch.zeros(vocab - 2000))) + torch.rand(vocab) * 0.1
    flat = torch.rand(vocab) * 0.1
    probs = torch.softmax(torch.stack((peaked, spread, flat, peaked, spread, flat, peaked)), dim=-1)
    top_ps = [0.9, 0.9, 0.9, 1.0, 0.5, 1e-9, 0.99]
    cut = [i for i, top_p in enumerate(top_ps) if top_p < 1.0]
    kept = _nucleus(probs, cut, [top_ps[i] for i in cut])
    for row, top_p in enumerate(top_ps):
        if top_p == 1.0:
            assert torch.equal(kept[row], probs[row])
            continue
        values, ids = torch.sort(probs[row], descending=True)
        before = values.cumsum(0) - values
        expected = torch.zeros_like(values).scatter_(0, ids, torch.where((before < top_p) | (before == 0), values, 0))
        assert torch.equal(kept[row], expected), row
    tiers = [next((width for width in NUCLEUS_CANDIDATES if torch.topk(probs[row], width).values.sum() >= top_ps[row]),
                  vocab) for row in cut]
    assert set(tiers) == {*NUCLEUS_CANDIDATES, vocab}  # every way really ran


def test_the_draw_follows_the_distribution_and_the_seeds():
    """The draw itself (no host sync, no multinomial), on rows of one distribution."""
    from server.engine.sampling import _draw

    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().repeat(3000, 1)
    params = [SamplingParams(1, temperature=1.0)] * 3000
    rows = list(range(3000))
    tokens = _draw(logits, rows, params, [make_generator(i, torch.device("cpu")) for i in rows])
    freq = torch.bincount(tokens, minlength=4).float() / 3000
    assert torch.allclose(freq, probs, atol=0.035), freq
    again = _draw(logits[:5], rows[:5], params[:5], [make_generator(i, torch.device("cpu")) for i in rows[:5]])
    assert torch.equal(again, tokens[:5])  # seeded: the same draws alone as in the batch
    nan_row = torch.full((1, 4), float("nan"))
    assert _draw(nan_row, [0], params[:1], [make_generator(0, torch.device("cpu"))]).shape == (1,)


def test_a_token_of_probability_zero_is_never_drawn_at_either_end_of_the_uniforms():
    """The draw searches each row's running sum at uniform x total. At a uniform of 0 the first token of
    positive probability is drawn, not a zero-probability one before it; at a uniform of 1 (curand's
    range is (0, 1]; torch maps its 1 to 0 today, which the draw does not rely on) the last token of
    positive probability, not the zero-probability tail nor an index past the vocabulary."""
    from server.engine.sampling import _inverse_cdf

    probs = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.7000001, 0.0, 0.0]] * 3)  # a total a hair off 1
    uniforms = torch.tensor([[0.0], [1.0], [0.35]], dtype=torch.float64)
    assert _inverse_cdf(probs, uniforms).tolist() == [2, 4, 4]
    assert _inverse_cdf(probs[:1], torch.tensor([[0.2]], dtype=torch.float64)).tolist() == [2]


def test_the_draw_across_blocks_of_a_vocabulary_follows_the_distribution():
    """The draw finds a block of CDF_BLOCK tokens, then the token inside it: over a vocabulary of several
    blocks (and not a multiple of the block: padded), tokens in different blocks are drawn at their
    probabilities, a boundary between blocks goes to the next token of positive probability, and the
    ends of the uniforms find the first and last token of positive probability."""
    from server.engine.sampling import CDF_BLOCK, _draw, _inverse_cdf

    vocab = 3 * CDF_BLOCK + 100
    probs = torch.zeros(vocab)
    chosen = [10, CDF_BLOCK + 20, CDF_BLOCK + 21, vocab - 1]
    probs[chosen] = torch.tensor([0.4, 0.2, 0.15, 0.25])
    logits = probs.log().repeat(3000, 1)
    rows = list(range(3000))
    tokens = _draw(logits, rows, [SamplingParams(1, temperature=1.0)] * 3000,
                   [make_generator(i, torch.device("cpu")) for i in rows])
    freq = torch.bincount(tokens, minlength=vocab).float() / 3000
    assert float(freq[chosen].sum()) == 1.0
    assert torch.allclose(freq[chosen], torch.tensor([0.4, 0.2, 0.15, 0.25]), atol=0.035), freq
    halves = torch.zeros(2, vocab)
    halves[:, [5, 2 * CDF_BLOCK + 7]] = 0.5
    ends = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    assert _inverse_cdf(halves, ends).tolist() == [2 * CDF_BLOCK + 7, 2 * CDF_BLOCK + 7]
    assert _inverse_cdf(halves[:1], torch.tensor([[0.0]], dtype=torch.float64)).tolist() == [5]
    # a block's float32 sum (1 + 7e-8 rounds up to 1 + 2**-23) above its exact running sum inside: the
    # offset is kept below the latter, so a uniform of 1 finds token 1, not the zero after it
    rounded = torch.tensor([[1.0, 7e-8, 0.0]])
    assert float(rounded.sum()) > 1.0 + 7e-8
    assert _inverse_cdf(rounded, torch.tensor([[1.0]], dtype=torch.float64)).tolist() == [1]


def test_a_seeded_row_draws_the_same_tokens_alone_or_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    params = [SamplingParams(1, temperature=0.9, top_p=0.95, seed=7), SamplingParams(1, temperature=0.0),
              SamplingParams(1, temperature=1.3), SamplingParams(1, temperature=0.7, presence_penalty=1.0),
              SamplingParams(1, temperature=1.0, logit_bias={3: 5.0}), SamplingParams(1, temperature=0.5)]

    def run(rows):
        generators = [make_generator(100 + r, torch.device("cpu")) for r in rows]
        counts = [counts_of(500, {1: 2}) for _ in rows]  # each row's own, growing with its tokens
        tokens = []
        for _ in range(20):
            tokens.append(sample_batch(logits[rows], [params[r] for r in rows], generators, counts).tokens)
        return [[step[i] for step in tokens] for i in range(len(rows))]

    together = run([0, 1, 2, 3, 4, 5])
    for row in range(6):
        assert run([row])[0] == together[row], row
    assert len(set(together[0])) > 1  # it really samples
