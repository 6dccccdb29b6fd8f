"""Model-agnostic decoding: greedy search and batched beam search.

Both use only the Seq2Seq contract (``encode``, ``init_state``, ``decode_step`` and the
``reorder`` of EncoderOut/DecoderState), never a model's type. Output length is bounded by
``max_len_a * len(src) + max_len_b``; at that bound EOS is forced.

Beam search keeps ``beam_size`` live hypotheses per sentence; a hypothesis that ends in EOS
is finalised with the GNMT length-normalised score log p(y|x) / lp(y),
lp(y) = ((5 + |y|) / 6)^alpha (Wu et al. 2016, eq. 14), and a sentence is done once it has
``beam_size`` finished hypotheses (as in fairseq).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS/EOS
    score: float  # length-normalised log-probability (greedy: plain sum)


def length_limits(src_mask: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """(B,) maximum output length (EOS included) per sentence: a * len(src) + b, at least 1."""
    return (a * src_mask.sum(1).float() + b).long().clamp(min=1)


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def greedy_search(
    model, src, src_mask, bos_id: int, eos_id: int, max_len_a: float = 1.5, max_len_b: int = 10
) -> list[Hypothesis]:
    """Pick the most probable token at every step, for a batch of sources (B, S)."""
    B = src.shape[0]
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    limits = length_limits(src_mask, max_len_a, max_len_b)
    tokens = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    scores = torch.zeros(B, device=src.device)
    steps = []
    for t in range(int(limits.max())):
        logits, state = model.decode_step(tokens, enc, state)
        logp = logits.float().log_softmax(-1)  # (B, V)
        nxt = logp.argmax(-1)
        nxt = torch.where(t + 1 >= limits, torch.full_like(nxt, eos_id), nxt)
        scores += torch.where(finished, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
        steps.append(nxt)
        finished |= nxt == eos_id
        if bool(finished.all()):
            break
        tokens = nxt
    out = torch.stack(steps, 1).tolist()  # (B, T)
    hyps = []
    for b, seq in enumerate(out):
        seq = seq[: seq.index(eos_id)] if eos_id in seq else seq
        hyps.append(Hypothesis(seq, float(scores[b])))
    return hyps


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
) -> list[list[Hypothesis]]:
    """Batched beam search. Returns, per sentence, ``nbest`` hypotheses sorted best first."""
    if nbest > beam_size:
        raise ValueError(f"decode.nbest={nbest} exceeds decode.beam_size={beam_size}")
    B, K, dev = src.shape[0], beam_size, src.device
    enc = model.encode(src, src_mask)
    expand = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) sentence of each beam
    enc = enc.reorder(expand)
    state = model.init_state(enc)
    limits = length_limits(src_mask, max_len_a, max_len_b)[expand]  # (B*K,)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step has K distinct
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=dev)
    history = torch.empty((B * K, 0), dtype=torch.long, device=dev)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(int(limits.max())):
        logits, state = model.decode_step(tokens, enc, state)
        logp = logits.float().log_softmax(-1)  # (B*K, V)
        V = logp.shape[1]
        at_limit = t + 1 >= limits
        if bool(at_limit.any()):  # only EOS may follow a hypothesis at its length limit
            eos_lp = logp[:, eos_id].clone()
            logp[at_limit] = float("-inf")
            logp[at_limit, eos_id] = eos_lp[at_limit]
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top, flat = cand.topk(2 * K, dim=1)  # (B, 2K): at most K of them end in EOS
        beam, tok = flat // V, flat % V
        is_eos = tok == eos_id

        # Finalise EOS candidates that rank among the top K (fairseq's rule).
        fin = is_eos[:, :K] & torch.isfinite(top[:, :K])
        if bool(fin.any()):
            lp = length_penalty(t + 1, alpha)
            for b, j in fin.nonzero().tolist():
                if done[b] or len(finished[b]) >= K:
                    continue
                parent = b * K + int(beam[b, j])
                finished[b].append(Hypothesis(history[parent].tolist(), float(top[b, j]) / lp))
            done |= torch.tensor([len(f) >= K for f in finished])
            if bool(done.all()):
                break

        # Continue with the K best candidates that do not end in EOS.
        order = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :K]  # (B, K)
        scores = top.gather(1, order)
        parent = (beam.gather(1, order) + torch.arange(B, device=dev)[:, None] * K).view(-1)
        tokens = tok.gather(1, order).view(-1)
        history = torch.cat([history[parent], tokens[:, None]], dim=1)
        state = state.reorder(parent)

    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: h.score, reverse=True)
        results.append(hyps[:nbest])
    return results
