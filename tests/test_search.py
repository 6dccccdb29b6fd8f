"""Search tests shared by both models through the Seq2Seq contract."""

import pytest
import torch
from tiny_models import BOS, EOS, PAD, V, make, sources

from transformer.search import Uncached, beam_search, greedy_search, length_limits, sample_search
from transformer.seq2seq import EncoderOut
from transformer.transformer_model import Transformer

KINDS = ["transformer", "additive", "dot"]


@pytest.mark.parametrize("kind", KINDS)
def test_beam_one_equals_greedy(kind):
    model = make(kind)
    src, mask = sources()
    greedy = greedy_search(model, src, mask, BOS, EOS)
    beam = beam_search(model, src, mask, BOS, EOS, beam_size=1, alpha=0.0)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    for g, b in zip(greedy, beam):
        assert b[0].score == pytest.approx(g.score, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_nbest_sorted_and_distinct(kind):
    model = make(kind)
    src, mask = sources()
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=4, nbest=4):
        scores = [h.score for h in hyps]
        assert len(hyps) == 4 and scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_one_at_a_time(kind):
    model = make(kind)
    src, mask = sources()
    batched = beam_search(model, src, mask, BOS, EOS, beam_size=3)
    for i in range(src.shape[0]):
        n = int(mask[i].sum())
        single = beam_search(model, src[i : i + 1, :n], mask[i : i + 1, :n], BOS, EOS, beam_size=3)
        assert single[0][0].tokens == batched[i][0].tokens
        assert single[0][0].score == pytest.approx(batched[i][0].score, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_output_length_bounded(kind):
    model = make(kind)
    src, mask = sources()
    for h in greedy_search(model, src, mask, BOS, EOS, max_len_a=0.0, max_len_b=3):
        assert len(h.tokens) <= 2  # 3 positions, the last one forced to EOS
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=3, max_len_a=0.0, max_len_b=3):
        assert all(len(h.tokens) <= 2 for h in hyps)


def test_a_huge_length_limit_does_not_wrap_around():
    """(a * len + b).long() past int64 wrapped to a negative limit, clamped to 1: every
    translation came back empty."""
    from transformer.search import length_limits

    mask = torch.tensor([[True, True, False], [True, True, True]])
    capped = type("Capped", (), {"max_target_len": 50})()
    for a, b in ((1e30, 0), (0.0, 1e19), (1.5, 1e30)):
        assert length_limits(capped, mask, a, b).tolist() == [50, 50]
        assert min(length_limits(object(), mask, a, b).tolist()) > 10**18
    assert length_limits(capped, mask, 1.5, 10).tolist() == [13, 14]  # as before: floor


def test_the_transformers_outputs_stop_at_its_positions():
    """A length limit beyond model.max_positions is capped there (EOS forced at the last
    position), not an error in the middle of decoding."""
    model = make("transformer")
    model.max_target_len = 6  # as a model built with max_positions=6 (its table is longer)
    src, mask = sources()
    long = dict(max_len_a=0.0, max_len_b=50, min_len=100)  # no EOS before the limit
    assert all(len(h.tokens) == 5 for h in greedy_search(model, src, mask, BOS, EOS, **long))
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=2, **long):
        assert all(len(h.tokens) == 5 for h in hyps)
    for hyps in sample_search(model, src, mask, BOS, EOS, nbest=2, **long):
        assert all(len(h.tokens) == 5 for h in hyps)
    assert Uncached(model).max_target_len == 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.6, 1.4])
def test_beam_scores_are_the_models_log_probability_over_the_gnmt_penalty(kind, alpha):
    # Every returned hypothesis is scored again by teacher forcing: the sum of the model's
    # log-probabilities of its tokens and EOS, over ((5 + |y|) / 6)^alpha with |y| counting
    # EOS (Wu et al. 2016, eq. 14), as a reader of the n-best scores would compute it.
    model = make(kind)
    src, mask = sources()
    beams = beam_search(model, src, mask, BOS, EOS, beam_size=4, alpha=alpha, nbest=4)
    for i, hyps in enumerate(beams):
        n = int(mask[i].sum())
        for h in hyps:
            tgt_in = torch.tensor([[BOS, *h.tokens]])
            tgt_out = torch.tensor([[*h.tokens, EOS]])
            with torch.no_grad():
                logp = model(src[i : i + 1, :n], mask[i : i + 1, :n], tgt_in).log_softmax(-1)
            total = float(logp.gather(-1, tgt_out[..., None]).sum())
            expected = total / ((5 + len(h.tokens) + 1) / 6) ** alpha
            assert h.score == pytest.approx(expected, abs=1e-4), (i, h.tokens)


class Markov:
    """A stub model for ``Uncached``: the next token's logits depend on the last token, the
    position (so that no two sequences tie) and the sentence (its first source id), strongly
    enough that EOS lands at every rank."""

    def __init__(self, seed: int, vocab: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.table = 2.5 * torch.randn(vocab, vocab, generator=g)
        self.bias = 1.5 * torch.randn(vocab, vocab, generator=g)
        self.position = torch.randn(16, vocab, generator=g)

    def encode(self, src, src_mask):
        return EncoderOut(self.bias[src[:, 0]][:, None, :], src_mask)  # memory (B, 1, V)

    def decode_prefix(self, tgt_in, enc):
        return self.table[tgt_in] + self.position[: tgt_in.shape[1]] + enc.memory  # (B, T, V)

    def log_probs(self, src_first: int, prefix: list[int]) -> torch.Tensor:
        last = ([BOS] + prefix)[-1]
        logits = self.table[last] + self.position[len(prefix)] + self.bias[src_first]
        return logits.log_softmax(-1)


def reference_beam(model, src_first, K, alpha, limit):
    """fairseq's rule one sentence at a time, in plain Python: of the 2K best candidates,
    those among the top K that end in EOS are finished (until K are), the K best others go
    on; EOS is the only choice at the length limit."""
    beams, finished = [([], 0.0)], []
    for t in range(limit):
        cands = []
        for tokens, score in beams:
            logp = model.log_probs(src_first, tokens)
            for v, lp in enumerate(logp.tolist()):
                if (t + 1 >= limit and v != EOS) or v == BOS:  # BOS is never an output
                    lp = float("-inf")
                cands.append((score + lp, tokens, v))
        top = sorted(cands, key=lambda c: -c[0])[: 2 * K]
        for score, tokens, v in top[:K]:
            if v == EOS and score > float("-inf") and len(finished) < K:
                finished.append((tokens, score / ((5 + t + 1) / 6) ** alpha))
        if len(finished) >= K:
            break
        beams = [(tokens + [v], score) for score, tokens, v in top if v != EOS][:K]
    return sorted(finished, key=lambda f: -f[1])


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_follows_the_finishing_rule_of_a_plain_reference(seed):
    model = Markov(seed)
    src = torch.arange(3, 12)[:, None].repeat(1, 2)  # 9 sentences, first ids 3..11
    mask = torch.ones_like(src, dtype=torch.bool)
    K, alpha, limit = 3, 0.6, 7
    got = beam_search(
        Uncached(model), src, mask, BOS, EOS, beam_size=K, alpha=alpha, max_len_a=0.0,
        max_len_b=limit, nbest=K,
    )  # fmt: skip
    for i, hyps in enumerate(got):
        expected = reference_beam(model, int(src[i, 0]), K, alpha, limit)
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected], i
        assert [h.score for h in hyps] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_no_search_outputs_bos_or_pad_however_likely_the_model_makes_them():
    """Samples took PAD or BOS mid-sentence (the tokenizer then dropped them from the text
    unseen); now every search leaves them out, and scores stay the model's log-probs."""
    model = Markov(0)
    model.table[:, [PAD, BOS]] += 6.0  # the most likely tokens after any other
    src = torch.arange(3, 12)[:, None].repeat(1, 2)
    mask = torch.ones_like(src, dtype=torch.bool)
    lim = dict(max_len_a=0.0, max_len_b=7, pad_id=PAD)
    greedy = greedy_search(Uncached(model), src, mask, BOS, EOS, **lim)
    beams = beam_search(Uncached(model), src, mask, BOS, EOS, beam_size=3, nbest=3, **lim)
    gen = torch.Generator().manual_seed(0)
    samples = sample_search(Uncached(model), src, mask, BOS, EOS, nbest=20, generator=gen, **lim)
    hyps = greedy + [h for group in beams + samples for h in group]
    assert len(hyps) == 9 * (1 + 3 + 20)
    assert not any({PAD, BOS} & set(h.tokens) for h in hyps)
    for i, h in enumerate(greedy):  # the sum of the model's own log-probabilities
        steps = [model.log_probs(int(src[i, 0]), h.tokens[:t]) for t in range(len(h.tokens) + 1)]
        total = sum(float(lp[v]) for lp, v in zip(steps, [*h.tokens, EOS]))
        assert h.score == pytest.approx(total, abs=1e-5)
    unbanned = greedy_search(Uncached(model), src, mask, BOS, EOS, max_len_a=0.0, max_len_b=7)
    assert all(BOS not in h.tokens for h in unbanned)  # BOS always; PAD only where named
    assert any(PAD in h.tokens for h in unbanned)  # the stub does make PAD likely


def test_the_length_limit_is_a_times_the_source_length_plus_b_as_python_computes_it():
    """float32 made 1.3 * 90 = 116.99999, floored to 116, and 2.1 * 30 = 62."""
    for n, a, b in [(90, 1.3, 0), (30, 2.1, 0), (7, 1.5, 10), (200, 0.1, 1)]:
        got = length_limits(None, torch.ones(1, n, dtype=torch.bool), a, b)
        assert int(got) == int(a * n + b), (n, a, b)


def test_a_transformer_built_with_max_positions_decodes_every_one_of_them():
    """Its outputs take all max_positions positions (EOS forced at the last), one per step."""
    torch.manual_seed(0)
    model = Transformer(V, V, PAD, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1,
                        n_dec_layers=1, max_positions=7).eval()  # fmt: skip
    src, mask = sources()
    long = dict(max_len_a=0.0, max_len_b=50, min_len=100)
    assert all(len(h.tokens) == 6 for h in greedy_search(model, src, mask, BOS, EOS, **long))


def test_a_length_limit_below_one_still_gives_every_input_a_translation():
    """a * len(src) + b under 1 (max_len_b=0 and a short source) is a limit of 1: EOS at once,
    an empty translation with the model's score, not no hypothesis (beam search) or an
    unscored one (greedy)."""
    model = make("transformer")
    src, mask = sources()
    lim = dict(max_len_a=0.1, max_len_b=0)  # 0.1 * len(src) < 1 for every source
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=2, **lim):
        assert [h.tokens for h in hyps] == [[]] and hyps[0].score < 0
    for h in greedy_search(model, src, mask, BOS, EOS, **lim):
        assert h.tokens == [] and h.score < 0
