"""Model-agnostic decoding: greedy search, sampling and batched beam search.

All of them use only the Seq2Seq contract (``encode``, ``init_state``, ``decode_step`` and the
``reorder`` of EncoderOut/DecoderState), never a model's type. Output length is bounded by
``max_len_a * len(src) + max_len_b``, and by the model's ``max_target_len`` (the
Transformer's ``max_positions``) where it has one; at that bound EOS is forced. Before
``min_len`` output tokens EOS is impossible (fairseq's ``--min-len``); the upper bound wins
over ``min_len``.

Beam search keeps ``beam_size`` live hypotheses per sentence; a hypothesis that ends in EOS
is finalised with the GNMT length-normalised score log p(y|x) / lp(y),
lp(y) = ((5 + |y|) / 6)^alpha (Wu et al. 2016, eq. 14), and a sentence is done once it has
``beam_size`` finished hypotheses (as in fairseq).

Sampling draws each token from softmax(logits / temperature), restricted to the ``top_k``
most probable tokens (Fan et al. 2018, "Hierarchical Neural Story Generation") and then to
the nucleus, the smallest set of most probable tokens whose probability reaches ``top_p``
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"). A seeded
``torch.Generator`` makes it reproducible.

``Uncached`` wraps a model so that every step re-runs its decoder over the whole prefix
(``decode_prefix``) instead of using the incremental state: the baseline that shows what the
cache buys, and a check that the cache changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .seq2seq import DecoderState, EncoderOut

NEG_INF = float("-inf")
# Finished rows (greedy, sampling) or sentences (beam) leave the batch once they are this
# fraction of it: fewer rows to decode, for one copy of the encoder output and the state.
SHRINK = 0.25


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS/EOS
    score: float  # beam: length-normalised log-probability; greedy/sampling: plain sum


def length_limits(model, src_mask: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """(B,) maximum output length (EOS included) per sentence: a * len(src) + b, at least 1,
    and at most the ``max_target_len`` of the model (its decoder's positions), if it has one."""
    cap = getattr(model, "max_target_len", None)
    # clamped before the cast: a limit past int64 (max_len_a=1e30) would wrap to negative;
    # in float64: float32 rounds 1.3 * 90 to 116.99999 (Python's 117.0), one token short
    limits = (a * src_mask.sum(1).double() + b).clamp(min=1, max=cap or 2**62)
    return limits.long()


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def apply_length_rules(
    logp: torch.Tensor, t: int, limits: torch.Tensor, min_limit: int, min_len: int, eos_id: int
) -> None:
    """In place on the (N, V) log-probabilities of output position ``t`` (0-based).

    EOS is impossible while ``t < min_len``; once ``t + 1`` reaches a row's limit EOS is its
    only choice. ``min_limit = int(limits.min())`` is passed from the host so that the steps
    before any limit cost no device work and no synchronisation.
    """
    at_some_limit = t + 1 >= min_limit
    eos_lp = logp[:, eos_id].clone() if at_some_limit else None  # (N,)
    if t < min_len:
        logp[:, eos_id] = NEG_INF
    if at_some_limit:
        at_limit = t + 1 >= limits  # (N,)
        logp.masked_fill_(at_limit[:, None], NEG_INF)
        logp[:, eos_id] = torch.where(at_limit, eos_lp, logp[:, eos_id])


def unproducible(bos_id: int, pad_id: int | None, eos_id: int, device) -> torch.Tensor:
    """The ids a search never outputs: BOS and PAD are inputs only. With label smoothing the
    model gives them a little probability, and samples took them mid-sentence (7 in 1,000
    samples of a small model), where the tokenizer dropped them from the text unseen and
    the next steps were conditioned on them. (Never EOS, should a vocabulary share its id.)"""
    ids = sorted({i for i in (bos_id, pad_id) if i is not None and i != eos_id})
    return torch.tensor(ids, dtype=torch.long, device=device)


def top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (N, V) with every token outside the kept set set to -inf (a new tensor).

    First the ``top_k`` largest (0 = all), then, of what is left, the nucleus: the most
    probable tokens, in order, until their probability reaches ``top_p`` (1.0 = all). The
    most probable token is always kept.
    """
    if 0 < top_k < logits.shape[-1]:
        values, idx = logits.topk(top_k, dim=-1)  # (N, k)
        logits = torch.full_like(logits, NEG_INF).scatter(-1, idx, values)
    if top_p < 1.0:
        probs, idx = logits.softmax(-1).sort(dim=-1, descending=True)  # (N, V) each
        before = probs.cumsum(-1) - probs  # mass of the more probable tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, idx, before >= top_p)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def sampler(
    temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """choose(logp (N, V)) -> (N,) ids drawn from the tempered, filtered distribution."""

    def choose(logp: torch.Tensor) -> torch.Tensor:
        filtered = top_k_top_p(logp / temperature, top_k, top_p)  # (N, V)
        return torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]

    return choose


def _one_path(model, enc: EncoderOut, limits, bos_id, eos_id, min_len, choose, pad_id=None):
    """One token per row per step, ``choose(logp (N, V)) -> (N,)``: greedy or sampling.

    Rows that have ended are dropped from the batch once they are a quarter of it.
    :return: per row the tokens before EOS and the summed model log-probability
    """
    N, dev = limits.shape[0], limits.device
    state = model.init_state(enc)
    rows = torch.arange(N, device=dev)  # original row of each batch row
    tokens = torch.full((N,), bos_id, dtype=torch.long, device=dev)
    ended = torch.zeros(N, dtype=torch.bool, device=dev)
    scores = torch.zeros(N, device=dev)
    history = torch.empty((N, 0), dtype=torch.long, device=dev)
    hyps: list[Hypothesis | None] = [None] * N
    min_limit = int(limits.min())
    never = unproducible(bos_id, pad_id, eos_id, dev)
    for t in range(int(limits.max())):
        logits, state = model.decode_step(tokens, enc, state)
        logp = logits.float().log_softmax(-1).index_fill_(1, never, NEG_INF)  # (n, V)
        apply_length_rules(logp, t, limits, min_limit, min_len, eos_id)
        nxt = choose(logp)
        scores += torch.where(ended, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        tokens = torch.where(ended, torch.full_like(nxt, eos_id), nxt)
        history = torch.cat([history, tokens[:, None]], dim=1)  # (n, t + 1)
        ended |= tokens == eos_id
        n_ended = int(ended.sum())
        if n_ended == len(ended):
            break
        if n_ended >= SHRINK * len(ended):
            _collect(hyps, rows[ended], history[ended], scores[ended], eos_id)
            keep = (~ended).nonzero()[:, 0]  # (n',)
            rows, tokens, ended, scores = rows[keep], tokens[keep], ended[keep], scores[keep]
            history, limits = history[keep], limits[keep]
            enc, state = enc.reorder(keep), state.reorder(keep)
    _collect(hyps, rows, history, scores, eos_id)
    return hyps


def _collect(hyps: list, rows, history, scores, eos_id: int) -> None:
    """hyps[row] = the tokens of ``history`` (n, t) before the first EOS, and the score."""
    for row, seq, score in zip(rows.tolist(), history.tolist(), scores.tolist()):
        hyps[row] = Hypothesis(seq[: seq.index(eos_id)] if eos_id in seq else seq, score)


@torch.no_grad()
def greedy_search(
    model,
    src,
    src_mask,
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 0,
    pad_id: int | None = None,
) -> list[Hypothesis]:
    """Pick the most probable token at every step, for a batch of sources (B, S). Every
    search never outputs BOS, nor ``pad_id`` where given (``unproducible``)."""
    enc = model.encode(src, src_mask)
    limits = length_limits(model, src_mask, max_len_a, max_len_b)
    argmax = lambda logp: logp.argmax(-1)  # noqa: E731
    return _one_path(model, enc, limits, bos_id, eos_id, min_len, argmax, pad_id)


@torch.no_grad()
def sample_search(
    model,
    src,
    src_mask,
    bos_id: int,
    eos_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    nbest: int = 1,
    generator: torch.Generator | None = None,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    min_len: int = 0,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Ancestral sampling: ``nbest`` independent samples per source, sorted by their model
    log-probability (summed, unnormalised), best first. Same ``generator`` state, same
    batch: same samples."""
    if temperature <= 0:
        raise ValueError(f"decode.temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"decode.top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"decode.top_k must be >= 0 (0 = off), got {top_k}")
    B = src.shape[0]
    expand = torch.arange(B, device=src.device).repeat_interleave(nbest)  # (B*n,) source row
    enc = model.encode(src, src_mask).reorder(expand)
    limits = length_limits(model, src_mask, max_len_a, max_len_b)[expand]
    choose = sampler(temperature, top_k, top_p, generator)
    flat = _one_path(model, enc, limits, bos_id, eos_id, min_len, choose, pad_id)
    groups = [flat[b * nbest : (b + 1) * nbest] for b in range(B)]
    return [sorted(g, key=lambda h: h.score, reverse=True) for g in groups]


def _finalise(finished, sents, top, beam, fin, history, t: int, alpha: float, K: int):
    """Move the EOS candidates marked in ``fin`` (n, 2K) into ``finished[sents[b]]``, in rank
    order, until a sentence has K. The candidates' positions, sentences, sequences and
    scores come to the host once each (a ``nonzero`` and three ``tolist``), not per
    candidate.

    :return: (n,) bool on the host, True for sentences that now have K hypotheses
    """
    lp = length_penalty(t + 1, alpha)
    b, j = fin.nonzero().unbind(1)  # (F,) each: sentence and candidate rank, in rank order
    parents = b * K + beam[b, j]  # (F,) row of the hypothesis each candidate extends
    sent_ids = sents.tolist()
    for bb, seq, score in zip(b.tolist(), history[parents].tolist(), (top[b, j] / lp).tolist()):
        if len(finished[sent_ids[bb]]) < K:
            finished[sent_ids[bb]].append(Hypothesis(seq, score))
    return torch.tensor([len(finished[i]) >= K for i in sent_ids])


@torch.no_grad()
def beam_search(
    model,
    src,
    src_mask,
    bos_id: int,
    eos_id: int,
    beam_size: int = 5,
    alpha: float = 0.6,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    nbest: int = 1,
    min_len: int = 0,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search. Returns, per sentence, ``nbest`` hypotheses sorted best first.

    Row b * K + k of every batch tensor is beam k of live sentence ``sents[b]``; finished
    sentences leave the batch once they are a quarter of it (``SHRINK``).
    """
    if nbest > beam_size:
        raise ValueError(f"decode.nbest={nbest} exceeds decode.beam_size={beam_size}")
    B, K, dev = src.shape[0], beam_size, src.device
    expand = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) sentence of each beam
    enc = model.encode(src, src_mask).reorder(expand)
    state = model.init_state(enc)
    limits = length_limits(model, src_mask, max_len_a, max_len_b)[expand]  # (B*K,)
    min_limit = int(limits.min())
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step has K distinct
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=dev)
    history = torch.empty((B * K, 0), dtype=torch.long, device=dev)
    sents = torch.arange(B)  # original index of each live sentence (host)
    done = torch.zeros(B, dtype=torch.bool)  # (n,) host: live sentence has K hypotheses
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    never = unproducible(bos_id, pad_id, eos_id, dev)
    for t in range(int(limits.max())):
        logits, state = model.decode_step(tokens, enc, state)
        logp = logits.float().log_softmax(-1).index_fill_(1, never, NEG_INF)  # (n*K, V)
        n, V = len(sents), logp.shape[1]
        apply_length_rules(logp, t, limits, min_limit, min_len, eos_id)
        cand = logp.add_(scores.view(-1, 1)).view(n, K * V)  # in place: no second (n*K, V)
        top, flat = cand.topk(2 * K, dim=1)  # (n, 2K)
        beam, tok = flat // V, flat % V  # at most K of the 2K end in EOS
        is_eos = tok == eos_id

        # Finalise EOS candidates that rank among the top K (fairseq's rule).
        fin = is_eos[:, :K] & torch.isfinite(top[:, :K])
        if bool(fin.any()):
            done = _finalise(finished, sents, top, beam, fin, history, t, alpha, K)
            if bool(done.all()):
                break

        # Continue with the K best candidates that do not end in EOS.
        order = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :K]  # (n, K)
        scores, tokens = top.gather(1, order), tok.gather(1, order)  # (n, K) each
        parent = beam.gather(1, order) + torch.arange(n, device=dev)[:, None] * K  # (n, K)
        if int(done.sum()) >= SHRINK * n:  # drop finished sentences from every batch tensor
            keep = (~done).nonzero()[:, 0]
            sents, done = sents[keep], done[keep]
            keep = keep.to(dev)
            scores, tokens, parent = scores[keep], tokens[keep], parent[keep]  # (n', K)
            enc, limits = enc.reorder(parent.view(-1)), limits[parent.view(-1)]
        tokens, parent = tokens.view(-1), parent.view(-1)  # (n'*K,)
        history = torch.cat([history[parent], tokens[:, None]], dim=1)  # (n'*K, t + 1)
        state = state.reorder(parent)
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]


class Uncached:
    """The decode contract without a cache: each step re-runs ``model.decode_prefix`` over the
    whole prefix, O(T^2) decoder work per sentence instead of O(T).

    The prefix (B, t) is the only state, kept in a DecoderState so that beam search reorders
    it like any other. Works for any model with ``decode_prefix(tgt_in, enc) -> (B, T, V)``.
    """

    def __init__(self, model):
        self.model = model
        self.max_target_len = getattr(model, "max_target_len", None)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOut:
        return self.model.encode(src, src_mask)

    def init_state(self, enc: EncoderOut) -> DecoderState:
        B = enc.src_mask.shape[0]
        prefix = torch.empty((B, 0), dtype=torch.long, device=enc.src_mask.device)  # (B, 0)
        return DecoderState({"prefix": prefix})

    def decode_step(self, prev_tokens: torch.Tensor, enc: EncoderOut, state: DecoderState):
        """prev_tokens (B,) -> logits (B, V) of the next position, from the full prefix."""
        prefix = torch.cat([state.tensors["prefix"], prev_tokens[:, None]], dim=1)  # (B, t+1)
        logits = self.model.decode_prefix(prefix, enc)[:, -1]  # (B, T, V) -> (B, V)
        return logits, DecoderState({"prefix": prefix}, step=state.step + 1)
