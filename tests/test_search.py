"""Search tests shared by both models through the Seq2Seq contract."""

import pytest
import torch

from transformer.rnn_model import BahdanauRNN
from transformer.search import beam_search, greedy_search
from transformer.transformer_model import Transformer

PAD, BOS, EOS, V = 0, 1, 2, 30


def make(kind):
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(
            V, V, PAD, d_model=32, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=2
        ).eval()
    return BahdanauRNN(V, V, PAD, emb_dim=16, hidden_size=32, attention=kind).eval()


def sources():
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, V, (4, 7), generator=g)
    src[1, 4:] = PAD
    src[3, 2:] = PAD
    return src, src != PAD


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
