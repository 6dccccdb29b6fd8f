"""metrics.Scorer (reference statistics counted once) gives what bleu/chrf give from scratch."""

import random

import pytest

from transformer.metrics import Scorer, bleu, chrf, score_all

WORDS = "a the dog Dog cat runs , . ü ß 12 xx".split()


def corpus(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8))) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 3, 40])
def test_scorer_matches_scoring_from_scratch_for_every_hypothesis_set(n):
    rng = random.Random(n)
    refs = corpus(rng, n)
    scorer = Scorer(refs)
    for _ in range(5):  # the same scorer, reused
        hyps = corpus(rng, n)
        got = scorer.score_all(hyps)
        b, b_sig = bleu(hyps, refs)
        c, c_sig = chrf(hyps, refs)
        lc, _ = bleu(hyps, refs, lowercase=True)
        rounded = tuple(round(x, 2) for x in (b, c, lc))
        assert (got["bleu"], got["chrf"], got["bleu_lc"]) == rounded
        assert (got["bleu_signature"], got["chrf_signature"], got["sentences"]) == (b_sig, c_sig, n)
        assert scorer.bleu(hyps) == b
        assert score_all(hyps, refs) == got


def test_scorer_names_a_length_mismatch():
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        Scorer(["a", "b", "c"]).score_all(["a", "b"])
