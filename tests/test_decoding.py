"""Decoding options: the uncached adapter, sampling (temperature, top-k, top-p, seed), min_len,
and the translator's dispatch on the decode config."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tiny_models import BOS, EOS, PAD, V, make, sources

from transformer import search as search_module
from transformer.search import (
    Uncached,
    beam_search,
    greedy_search,
    sample_search,
    sampler,
    top_k_top_p,
)
from transformer.translator import decode_options, search

KINDS = ["transformer", "additive"]


class Recorder:
    """Passes the contract through, recording each step's logits; ``eos_bias`` is added to
    the EOS logit (a model that wants to stop at once)."""

    def __init__(self, model, eos_bias=0.0):
        self.model, self.eos_bias, self.logits = model, eos_bias, []

    def encode(self, src, src_mask):
        return self.model.encode(src, src_mask)

    def init_state(self, enc):
        return self.model.init_state(enc)

    def decode_step(self, prev, enc, state):
        logits, state = self.model.decode_step(prev, enc, state)
        logits = logits.clone()
        logits[:, EOS] += self.eos_bias
        self.logits.append(logits)
        return logits, state


# -- cached == uncached -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_uncached_greedy_equals_cached(kind):
    model = make(kind)
    src, mask = sources()
    cached = greedy_search(model, src, mask, BOS, EOS)
    uncached = greedy_search(Uncached(model), src, mask, BOS, EOS)
    assert [h.tokens for h in cached] == [h.tokens for h in uncached]
    assert any(len(h.tokens) > 3 for h in cached)  # long enough for the cache to matter
    for a, b in zip(cached, uncached):
        assert a.score == pytest.approx(b.score, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_uncached_beam_nbest_equals_cached(kind):
    model = make(kind)
    src, mask = sources()
    cached = beam_search(model, src, mask, BOS, EOS, beam_size=5, nbest=5)
    uncached = beam_search(Uncached(model), src, mask, BOS, EOS, beam_size=5, nbest=5)
    for a, b in zip(cached, uncached):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_prefix_last_position_equals_decode_step(kind):
    model = make(kind)
    src, mask = sources()
    enc = model.encode(src, mask)
    state = model.init_state(enc)
    prefix = torch.randint(3, V, (4, 5))
    prefix[:, 0] = BOS
    with torch.no_grad():
        full = model.decode_prefix(prefix, enc)  # (B, T, V)
        for t in range(prefix.shape[1]):
            logits, state = model.decode_step(prefix[:, t], enc, state)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dropping_finished_rows_changes_nothing(kind, monkeypatch):
    model = make(kind)
    src, mask = sources(B=8, S=6, seed=5)
    src[::2, 3:] = PAD  # varied lengths, so rows finish at different steps
    mask = src != PAD
    runs = []
    for shrink in (0.0, 2.0):  # drop ended rows at once / never
        monkeypatch.setattr(search_module, "SHRINK", shrink)
        greedy = greedy_search(model, src, mask, BOS, EOS, max_len_a=1.0, max_len_b=4)
        beam = beam_search(model, src, mask, BOS, EOS, beam_size=3, nbest=3)
        runs.append(([h.tokens for h in greedy], [[h.tokens for h in b] for b in beam]))
    assert runs[0] == runs[1]  # (sampling draws differ: fewer rows, other random stream)
    assert len({len(t) for t in runs[0][0]}) > 1  # the rows did end at different steps


# -- sampling ------------------------------------------------------------------------------------
def draw(model, seed, **kw):
    src, mask = sources()
    gen = torch.Generator().manual_seed(seed)
    return sample_search(model, src, mask, BOS, EOS, generator=gen, **kw)


def tokens_of(nbest):
    return [[h.tokens for h in hyps] for hyps in nbest]


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_reproducible_with_seed(kind):
    model = make(kind)
    kw = dict(temperature=1.5, top_p=0.95, nbest=3)
    first, again, other = draw(model, 7, **kw), draw(model, 7, **kw), draw(model, 8, **kw)
    assert tokens_of(first) == tokens_of(again)
    assert tokens_of(first) != tokens_of(other)
    for hyps in first:
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_one_equals_greedy(kind):
    model = make(kind)
    src, mask = sources()
    greedy = greedy_search(model, src, mask, BOS, EOS)
    sampled = draw(model, 0, temperature=2.0, top_k=1)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in sampled]
    for g, s in zip(greedy, sampled):
        assert s[0].score == pytest.approx(g.score, abs=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.6)])
def test_sampled_tokens_lie_in_kept_set(top_k, top_p, monkeypatch):
    """Every sampled token is among the tokens the filter keeps for that step's logits."""
    monkeypatch.setattr(search_module, "SHRINK", 2.0)  # rows stay put: logits row = input row
    rec = Recorder(make("transformer"))
    hyps = draw(rec, 1, temperature=3.0, top_k=top_k, top_p=top_p)
    for row, h in enumerate(hyps):
        for t, tok in enumerate(h[0].tokens):
            logp = rec.logits[t][row : row + 1].log_softmax(-1)
            logp[:, BOS] = float("-inf")  # never an output (search.unproducible)
            kept = top_k_top_p(logp / 3.0, top_k, top_p)
            assert torch.isfinite(kept[0, tok]), (row, t, tok)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_the_tempered_distribution(temperature):
    """20,000 draws from one row follow softmax(logp / temperature), not softmax(logp):
    at 0.5 and 2.0 the two differ by 0.22 and 0.19 on the likeliest token, against a
    tolerance of 0.02 (about six standard errors). The tests above, drawn at 3.0 and
    checked against the kept set, passed with the temperature ignored."""
    logp = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    n = 20_000
    choose = sampler(temperature, 0, 1.0, torch.Generator().manual_seed(0))
    drawn = torch.bincount(choose(logp.expand(n, -1)), minlength=4) / n
    expected = (logp[0] / temperature).softmax(-1)
    assert (expected - logp[0].exp()).abs().max() > 0.15  # the test tells them apart
    torch.testing.assert_close(drawn, expected, atol=0.02, rtol=0)


# -- the filter, on random logits -----------------------------------------------------------------
logit_rows = st.lists(st.floats(-8.0, 8.0, allow_nan=False, width=32), min_size=2, max_size=40).map(
    lambda xs: torch.tensor(xs)[None]
)  # (1, V)


@settings(max_examples=150, deadline=None)
@given(logits=logit_rows, k=st.integers(0, 45))
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    kept = torch.isfinite(top_k_top_p(logits, top_k=k))[0]
    n = logits.shape[1]
    assert int(kept.sum()) == (min(k, n) if k > 0 else n)
    if not kept.all():
        assert logits[0, kept].min() >= logits[0, ~kept].max()


@settings(max_examples=150, deadline=None)
@given(logits=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(logits, p):
    probs = logits[0].double().softmax(-1)
    kept = torch.isfinite(top_k_top_p(logits, top_p=p))[0]
    mass = float(probs[kept].sum())
    # a most probable token (ties, and near-ties that float32 rounds to ties: any of them)
    assert probs[kept].max() >= probs.max() - 1e-6
    assert mass >= p - 1e-5  # reaches p ...
    assert mass - float(probs[kept].min()) < p + 1e-5  # ... and no kept token is superfluous
    if not kept.all():  # the most probable ones (up to float32 rounding of near-ties)
        assert probs[kept].min() >= probs[~kept].max() - 1e-6


@settings(max_examples=50, deadline=None)
@given(
    logits=logit_rows,
    k=st.integers(1, 6),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampler_draws_only_kept_tokens(logits, k, p, seed):
    logp = logits.log_softmax(-1).expand(64, -1)  # (64, V): 64 draws at once
    kept = torch.isfinite(top_k_top_p(logp[:1], k, p))[0]
    drawn = sampler(1.0, k, p, torch.Generator().manual_seed(seed))(logp)
    assert kept[drawn].all()


# -- min_len --------------------------------------------------------------------------------------
def eager_to_stop(kind):
    return Recorder(make(kind), eos_bias=50.0)


@pytest.mark.parametrize("kind", KINDS)
def test_min_len_respected_by_every_search(kind):
    src, mask = sources()
    model = eager_to_stop(kind)
    assert all(h.tokens == [] for h in greedy_search(model, src, mask, BOS, EOS))
    for h in greedy_search(model, src, mask, BOS, EOS, min_len=4):
        assert len(h.tokens) == 4  # EOS as soon as it is allowed
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=3, nbest=3, min_len=4):
        assert len(hyps) == 3 and all(len(h.tokens) >= 4 for h in hyps)
    for hyps in draw(model, 0, nbest=2, min_len=4):
        assert all(len(h.tokens) == 4 for h in hyps)


def test_length_limit_wins_over_min_len():
    src, mask = sources()
    model = make("transformer")
    limit = dict(max_len_a=0.0, max_len_b=3, min_len=10)
    assert all(len(h.tokens) == 2 for h in greedy_search(model, src, mask, BOS, EOS, **limit))
    for hyps in beam_search(model, src, mask, BOS, EOS, beam_size=3, **limit):
        assert all(len(h.tokens) == 2 for h in hyps)


# -- translator dispatch --------------------------------------------------------------------------
def test_decode_configs_dispatch(compose):
    src, mask = sources()
    model = make("transformer")
    decode = {
        name: compose([f"decode={name}", "run_dir=/tmp/unused"]).decode
        for name in ("greedy", "beam", "sample")
    }
    assert decode["beam"].min_len == 0 and decode["sample"].sample
    greedy = search(model, src, mask, BOS, EOS, decode["greedy"])
    beam = search(model, src, mask, BOS, EOS, decode["beam"])
    assert greedy == [[h] for h in greedy_search(model, src, mask, BOS, EOS)]
    assert beam == beam_search(model, src, mask, BOS, EOS, beam_size=5, alpha=0.6)
    gen = torch.Generator().manual_seed(3)
    sampled = search(model, src, mask, BOS, EOS, decode["sample"], gen)
    assert tokens_of(sampled) == tokens_of(draw(model, 3, top_p=0.9))
    decode["sample"].beam_size = 2
    with pytest.raises(ValueError, match="decode.beam_size=1"):
        search(model, src, mask, BOS, EOS, decode["sample"], gen)


def test_each_decode_option_set_away_from_its_default_takes_effect():
    """The test above decodes with the options at their defaults, where one that the
    translator drops on its way to the search changes nothing: here each is moved, and
    decodes as it says."""
    src, mask = sources()

    def run(model, **options):
        opts = decode_options(OmegaConf.create(options))
        return search(model, src, mask, BOS, EOS, opts, torch.Generator().manual_seed(0))

    # Sampling: a tiny temperature, top_k=1 or a tiny top_p each leave the greedy choice only
    model = make("transformer")
    greedy = [hyps[0].tokens for hyps in run(model)]
    sample = dict(sample=True, nbest=2)
    assert tokens_of(run(model, **sample)) != [[g, g] for g in greedy]  # the test tells apart
    for option in ({"temperature": 0.01}, {"top_k": 1}, {"top_p": 0.01}):
        assert tokens_of(run(model, **sample, **option)) == [[g, g] for g in greedy], option

    # Beam search, with a model that would stop at once: EOS is impossible before min_len,
    # which the length limit a * len(src) + b overrules (EOS forced at its last position)
    model = eager_to_stop("transformer")
    lengths = dict(min_len=10, max_len_a=0.5, max_len_b=1)
    limits = (0.5 * mask.sum(1) + 1).long().tolist()  # [4, 3, 4, 2]
    plain = run(model, beam_size=3, nbest=3, **lengths)
    assert [[len(h.tokens) for h in hyps] for hyps in plain] == [[n - 1] * 3 for n in limits]
    # the scores, divided by ((5 + |y|) / 6)^alpha (|y| with EOS), where alpha was 0
    penalised = run(model, beam_size=3, nbest=3, length_penalty=1.4, **lengths)
    for a, b, n in zip(plain, penalised, limits):
        assert [h.tokens for h in b] == [h.tokens for h in a]
        lp = ((5 + n) / 6) ** 1.4
        assert [h.score * lp for h in b] == pytest.approx([h.score for h in a], abs=1e-4)


def test_the_translated_lines_are_the_best_of_each_n_best_list():
    """translate_lines (validation and the final test translations) writes the first, best,
    hypothesis of each n-best list, whatever decode.nbest is."""
    from transformer.translator import encode_sources, translate_ids, translate_lines

    class Ids:  # words are the ids themselves
        pad_id, bos_id, eos_id = PAD, BOS, EOS

        def encode(self, lines):
            return [[int(w) for w in line.split()] for line in lines]

        def decode(self, seqs):
            return [" ".join(map(str, s)) for s in seqs]

    model, src, cpu = make("transformer"), sources()[0], torch.device("cpu")
    lines = [" ".join(str(i) for i in row if i != PAD) for row in src.tolist()]

    def translate(**options):
        return translate_lines(model, lines, Ids(), Ids(), OmegaConf.create(options), cpu, 50)

    four = dict(beam_size=4, nbest=4)
    assert translate(**four) == translate(beam_size=4)  # the best of 4 is the 1-best
    ids = encode_sources(lines, Ids(), 50)
    assert all(h[0][0] != h[-1][0] for h in translate_ids(model, ids, Ids(), four, cpu))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"beam_size": 0}, "decode.beam_size must be an integer >= 1, got 0"),
        ({"nbest": 0}, "decode.nbest must be an integer >= 1"),
        ({"min_len": -1}, "decode.min_len must be an integer >= 0"),
        ({"max_tokens": 0}, "decode.max_tokens must be an integer >= 1"),
        ({"top_k": -1}, "decode.top_k must be an integer >= 0"),
        ({"beam_size": 2.5}, "decode.beam_size must be an integer >= 1, got 2.5"),
        ({"length_penalty": -0.5}, "decode.length_penalty must be a number >= 0"),
        ({"max_len_a": "x"}, "decode.max_len_a must be a number >= 0, got 'x'"),
        # a negative b made every limit 1 for short sources: empty translations, exit 0
        ({"max_len_b": -100}, "decode.max_len_b must be a number >= 0, got -100"),
        # OmegaConf's words were "Key 'beam' is not in struct", without decode.
        ({"beam": 3}, r"decode.beam is not a decode setting \(they are: beam_size, "),
        # torch's generators take up to 2**64 - 1: this failed after training, keyless
        ({"seed": 2**64}, r"decode.seed must be an integer in \[0, 2\*\*64\), got 1844"),
        ({"temperature": 0}, "decode.temperature must be a number > 0"),
        ({"top_p": 1.5}, r"decode.top_p must be a number in \(0, 1\]"),
        ({"sample": "yes"}, "decode.sample must be true or false"),
        ({"sample": True, "beam_size": 2}, "needs decode.beam_size=1, got 2"),
        ({"beam_size": 2, "nbest": 3}, "decode.nbest=3 exceeds decode.beam_size=2"),
    ],
)
def test_bad_decode_options_name_their_key(override, message):
    with pytest.raises(ValueError, match=message):
        decode_options(OmegaConf.create(override))


def test_decode_options_complete_a_partial_config():
    opts = decode_options(OmegaConf.create({"beam_size": 1, "max_tokens": 100}))
    assert opts.max_tokens == 100 and opts.min_len == 0 and opts.sample is False
    with pytest.raises(Exception, match="top_kk"):
        decode_options(OmegaConf.create({"top_kk": 5}))


def test_top_p_stops_where_the_mass_reaches_it_exactly():
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(top_k_top_p(logits, top_p=0.5))[0].tolist() == [True, False, False]
    assert torch.isfinite(top_k_top_p(logits, top_p=0.75))[0].tolist() == [True, True, False]


def test_batched_translation_gives_each_input_line_its_own_output(tiny_ckpt, corpus_root):
    # translate_ids sorts the lines by length into batches: every output must come back to
    # its own input line, as translating that line alone gives it.
    from transformer.evaluate import decode_setting
    from transformer.translator import encode_sources, load_for_inference, translate_ids

    model, src_tok, tgt_tok, cfg = load_for_inference(tiny_ckpt, torch.device("cpu"))
    words = (corpus_root / "multi30k" / "test2016.de").read_text("utf-8").split()
    lines = [" ".join(words[k : k + n]) for k, n in enumerate((1, 4, 2, 7, 3, 6, 1, 5, 2, 8))]
    lines.insert(5, "")
    ids = encode_sources(lines, src_tok, cfg["data"]["max_len"])
    assert len({len(s) for s in ids}) > 4  # lengths that sorting reorders
    _, greedy = decode_setting("greedy:max_tokens=60")  # several batches
    together = translate_ids(model, ids, tgt_tok, greedy, torch.device("cpu"))
    alone = [translate_ids(model, [s], tgt_tok, greedy, torch.device("cpu"))[0] for s in ids]
    assert [[t for t, _ in h] for h in together] == [[t for t, _ in h] for h in alone]
    for a, b in zip(together, alone):  # scores: batched padding moves the last bits only
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-3)
    assert together[5] == [] and len({tuple(h[0][0]) for h in together if h}) > 3


def test_the_best_translation_is_the_first_of_the_n_best():
    from transformer.translate_cli import format_output

    class Words:
        def decode(self, seqs):
            return [" ".join(map(str, s)) for s in seqs]

    nbest = [[([7, 8], -0.1), ([9], -0.5)], []]
    best, lines = format_output(nbest, Words(), 2)
    assert best == ["7 8", ""]
    assert lines == ["0\t-0.1000\t7 8", "0\t-0.5000\t9", "1\t0.0000\t"]


def test_only_lines_over_max_len_are_truncated_and_named(caplog):
    from transformer.translator import encode_sources

    class Words:
        eos_id = 2

        def encode(self, lines):
            return [[5] * len(line.split()) for line in lines]

    ids = encode_sources(["a b c", "a b c d", "", "a"], Words(), max_len=3)
    assert ids == [[5, 5, 5, 2], [5, 5, 5, 2], [], [5, 2]]
    assert "1 input line(s) longer than 3 subwords truncated (line 2)" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_each_of_n_samples_is_drawn_for_its_own_source(kind):
    """With top_k=1 every sample is the greedy translation: all ``nbest`` samples of a
    source, not samples of other sources grouped under it."""
    model = make(kind)
    src, mask = sources()
    greedy = greedy_search(model, src, mask, BOS, EOS)
    assert len({round(h.score, 3) for h in greedy}) == len(greedy)  # sources tell apart
    for g, hyps in zip(greedy, draw(model, 0, top_k=1, nbest=3)):
        assert [h.tokens for h in hyps] == [g.tokens] * 3
        assert [h.score for h in hyps] == pytest.approx([g.score] * 3, abs=1e-5)
