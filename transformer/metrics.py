"""Corpus-level sacreBLEU (Papineni et al. 2002; Post 2018) and chrF (Popović 2015).

Pure functions: detokenized strings in, floats on a 0-100 scale and signatures out.
BLEU is cased, detokenized, with sacreBLEU's default 13a tokenizer unless asked otherwise.
"""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF


def bleu(hyps: list[str], refs: list[str], lowercase: bool = False, tokenize: str = "13a"):
    """Return (score 0-100, signature string)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    metric = BLEU(lowercase=lowercase, tokenize=tokenize)
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def chrf(hyps: list[str], refs: list[str]):
    """Return (chrF 0-100, signature string)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    metric = CHRF()
    return metric.corpus_score(hyps, [refs]).score, str(metric.get_signature())


def score_all(hyps: list[str], refs: list[str]) -> dict:
    """BLEU (cased 13a), chrF, and lowercased BLEU for comparison with papers."""
    b, b_sig = bleu(hyps, refs)
    c, c_sig = chrf(hyps, refs)
    lc, lc_sig = bleu(hyps, refs, lowercase=True)
    return {
        "bleu": round(b, 2),
        "bleu_signature": b_sig,
        "chrf": round(c, 2),
        "chrf_signature": c_sig,
        "bleu_lc": round(lc, 2),
        "bleu_lc_signature": lc_sig,
        "sentences": len(hyps),
    }
