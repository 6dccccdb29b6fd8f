"""Linear (kernelized) attention, Katharopoulos et al. 2020: O(n d^2) time, and a
recurrent state instead of a KV cache when decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kinds import AttentionKind
from .masks import causal_mask, is_key_mask, mask_and
from .patterns import blocks, unblock


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, eq. 7)."""
    return F.elu(x) + 1.0


def _causal_linear(fq, fk, v, chunk: int, eps: float) -> torch.Tensor:
    """Causal linear attention by prefix sums over chunks of C positions, exact:
    out_i = phi(q_i) S_i / phi(q_i) . z_i with S_i = sum_{j<=i} phi(k_j) v_j^T,
    z_i = sum_{j<=i} phi(k_j). Earlier chunks enter through a running sum of S (one d x d
    matrix per chunk), the current chunk through a masked C x C product: O(n (C + d) d) time,
    O(n (C + d) + (n / C) d^2) memory (the C x C products take n C), where a per-position
    cumsum of S would need O(n d^2). C is ``chunk``, or n when n is shorter: a sequence no
    longer than ``chunk`` is one masked n x n product, with no prefix sum (every Multi30k
    target, at most 53 subwords, under the default chunk of 64).
    """
    B, h, T, d = fq.shape
    C = min(chunk, T)
    fq, fk, v = (blocks(x, C) for x in (fq, fk, v))  # (B, h, m, C, d)
    kv = fk.transpose(-2, -1) @ v  # (B, h, m, d, d_v) sum over each chunk
    z = fk.sum(3)  # (B, h, m, d)
    S = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2).cumsum(2)  # before chunk
    Z = torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, :-1]], 2).cumsum(2)  # (B, h, m, d)
    a = (fq @ fk.transpose(-2, -1)).tril()  # (B, h, m, C, C) causal inside the chunk
    num = fq @ S + a @ v  # (B, h, m, C, d_v)
    den = (fq @ Z.unsqueeze(-1)).squeeze(-1) + a.sum(-1)  # (B, h, m, C)
    return unblock(num / den.clamp_min(eps).unsqueeze(-1), T)  # (B, h, T, d_v)


class Linear(AttentionKind):
    """Linear (kernelized) attention, Katharopoulos et al. 2020: the softmax kernel replaced
    by phi(q_i) . phi(k_j), phi = elu + 1, so out_i = phi(q_i) (sum_j phi(k_j) v_j^T) /
    (phi(q_i) . sum_j phi(k_j)): O(n d^2) time, O(d^2) state instead of O(n^2) weights.

    Causal: prefix sums (``_causal_linear``). Decoding is a recurrence: the cache is the
    state (S (B, h, d, d), z (B, h, 1, d)) instead of past keys and values, so a step costs
    O(d^2) whatever the length. There is no weight matrix to drop out: attention dropout does
    not apply. ``need_weights`` takes the quadratic form phi(q) phi(k)^T, row-normalised.
    Both compute in fp32 under any autocast or activation dtype (the sums run over every key)
    and return the activations' dtype.
    """

    eps = 1e-6

    def __init__(self, chunk: int = 64):
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
        # In fp32 whatever the activations' dtype: the sums over n keys (kv, z, den) grow
        # with n, and in fp16 den passed 65504 at 1,024 keys (d 64), where num / inf
        # gave rows of zeros without a NaN to show it (tests/test_attention_kinds.py)
        wide = _at_least_fp32(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            q_, k_, v_ = q.to(wide), k.to(wide), v.to(wide)
            out, weights = self._forward(q_, k_, v_, mask, causal, need_weights)
        return out.to(q.dtype), (None if weights is None else weights.to(q.dtype))

    def _forward(self, q, k, v, mask, causal, need_weights):
        T_q, T_k = q.shape[2], k.shape[2]
        fq, fk = elu_feature(q), elu_feature(k)
        if need_weights or not is_key_mask(mask) or (causal and T_q != T_k):
            mask = mask_and(mask, causal_mask(T_q, q.device, T_k) if causal else None)
            a = fq @ fk.transpose(-2, -1)  # (B, h, T_q, T_k)
            a = a if mask is None else a * mask
            weights = a / a.sum(-1, keepdim=True).clamp_min(self.eps)
            return weights @ v, (weights if need_weights else None)
        if mask is not None:
            fk = fk * mask[:, :, 0, :, None]  # (B', 1, T_k, 1): masked keys add nothing
        if causal:
            return _causal_linear(fq, fk, v, self.chunk, self.eps), None
        kv = fk.transpose(-2, -1) @ v  # (B, h, d, d_v) = sum_j phi(k_j) v_j^T
        den = fq @ fk.sum(2).unsqueeze(-1)  # (B, h, T_q, d) @ (B, h, d, 1) -> (B, h, T_q, 1)
        return fq @ kv / den.clamp_min(self.eps), None

    def empty_cache(self, B: int, h: int, d: int, like: torch.Tensor):
        # running sums over every step so far: in fp32 at least, as in forward
        wide = _at_least_fp32(like.dtype)
        return like.new_zeros(B, h, d, d, dtype=wide), like.new_zeros(B, h, 1, d, dtype=wide)

    def step(self, q, k_new, v_new, cache, need_weights: bool = False):
        wide = cache[0].dtype
        with torch.autocast(q.device.type, enabled=False):
            fq, fk = elu_feature(q.to(wide)), elu_feature(k_new.to(wide))  # (B, h, 1, d)
            S = cache[0] + fk.transpose(-2, -1) @ v_new.to(wide)  # (B, h, d, 1) @ (B, h, 1, d_v)
            z = cache[1] + fk  # (B, h, 1, d)
            den = (fq * z).sum(-1, keepdim=True).clamp_min(self.eps)  # (B, h, 1, 1)
            out = fq @ S / den
        return out.to(q.dtype), (S, z), None
