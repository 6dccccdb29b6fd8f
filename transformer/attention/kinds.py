"""The interface every attention kind implements (``AttentionKind``), the explicit path
that materialises the weights, and the dense kinds: scaled dot-product (Vaswani et al.
2017), dot (Luong et al. 2015) and additive (Bahdanau et al. 2014).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import dropout
from .masks import as_bool, causal_mask, mask_and, masked_softmax


def drop_weights(weights, p: float):
    """Attention dropout on the weights (none at p = 0: no mask drawn)."""
    return dropout(weights, p) if p > 0 else weights


def _weighted(weights, v, dropout: float, need_weights: bool):
    """(weights, dropped out) @ v, and the weights when asked for."""
    return drop_weights(weights, dropout) @ v, (weights if need_weights else None)


def explicit_attention(
    q, k, v, mask, dropout: float, need_weights: bool, scale: float | None = None
):
    """Dot-product attention with explicit (T_q, T_k) weights: for plots and general masks."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _weighted(
        masked_softmax(q @ k.transpose(-2, -1) * scale, mask), v, dropout, need_weights
    )


def _attend_subset(q, k, v, idx: torch.Tensor, need_weights: bool):
    """One decoder query (B, h, 1, d) over the keys at positions ``idx`` (1-D) of k, v
    (B, h, t, d), scaled dot-product; weights scattered back to (B, h, 1, t) if asked."""
    out, weights = explicit_attention(q, k[:, :, idx], v[:, :, idx], None, 0.0, True)
    if not need_weights:
        return out, None
    full = weights.new_zeros(*weights.shape[:-1], k.shape[2])  # (B, h, 1, t)
    full[..., idx] = weights
    return out, full


class AttentionKind(nn.Module):
    """How queries score keys and which keys they see, over already projected heads.

    ``forward(q, k, v, mask, causal, dropout, need_weights) -> (out, weights | None)`` with
    q (B, h, T_q, d), k and v (B, h, T_k, d), out (B, h, T_q, d), weights (B, h, T_q, T_k).
    Incremental decoding (decoder self-attention, one query per step, no padding among its
    keys): ``cache = empty_cache(B, h, d, like)``, then per step
    ``out, cache, weights = step(q, k_new, v_new, cache, need_weights)``. The cache is a pair
    of tensors with the batch first, so ``DecoderState.reorder`` can select beams. This base
    class keeps every key and value (a KV cache) and calls ``forward`` with the query last.
    """

    def empty_cache(self, B: int, h: int, d: int, like: torch.Tensor):
        empty = like.new_zeros(B, h, 0, d)  # (B, h, 0, d)
        return empty, empty

    def step(self, q, k_new, v_new, cache, need_weights: bool = False):
        k = torch.cat([cache[0], k_new], dim=2)  # (B, h, t, d)
        v = torch.cat([cache[1], v_new], dim=2)
        idx = self.step_keys(k.shape[2], k.device)
        if idx is None:
            out, weights = self(q, k, v, None, True, 0.0, need_weights)
        else:
            out, weights = _attend_subset(q, k, v, idx, need_weights)
        return out, (k, v), weights

    def step_keys(self, t: int, device) -> torch.Tensor | None:
        """Positions (1-D) a decoder step at position t - 1 attends to; None = use forward."""
        return None


class ScaledDot(AttentionKind):
    """softmax(q k^T / sqrt(d_k)) v (Vaswani et al. 2017, eq. 1); O(n^2 d) time.

    Runs ``F.scaled_dot_product_attention``, whose fused kernels keep memory O(n d);
    ``need_weights`` (plots) takes the explicit path, which materialises the (n, n) weights.
    """

    scale: float | None = None  # None: SDPA's default 1/sqrt(d_k)

    def forward(self, q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
        T_q, T_k = q.shape[2], k.shape[2]
        if need_weights:
            mask = mask_and(as_bool(mask), causal_mask(T_q, q.device, T_k) if causal else None)
            return explicit_attention(q, k, v, mask, dropout, True, self.scale)
        # SDPA's own causal flag (top-left aligned) keeps the flash kernel eligible; one query
        # after a cache sees every key and needs no mask at all.
        is_causal = causal and T_q == T_k and mask is None
        if causal and T_q > 1 and not is_causal:
            mask = mask_and(as_bool(mask), causal_mask(T_q, q.device, T_k))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
        )
        return out, None


class Dot(ScaledDot):
    """Multiplicative score q_i . k_j without the 1/sqrt(d_k) scale (Luong et al. 2015,
    "dot"); O(n^2 d), fused kernel. Large d_k saturates its softmax at initialisation, which
    the scale corrects (bench/attention_claims.py measures it)."""

    scale = 1.0


class Additive(AttentionKind):
    """Bahdanau et al. 2014 (Appendix A.1.2) per head: e_ij = w_h^T tanh(q_i + k_j).

    q_i = W s and k_j = U h_j are this head's query and key projections, so the only new
    parameter is w_h, one vector per head. O(n^2 d) time and O(n^2 d) memory: tanh is taken
    for every query-key pair. Always explicit (no fused kernel).
    """

    def __init__(self, n_heads: int, d_head: int):
        super().__init__()
        # (h, d) w_h; inside the Transformer, its reset_parameters re-draws it Xavier-uniform
        # (as every matrix there), which the committed runs of this kind trained with
        self.score = nn.Parameter(torch.randn(n_heads, d_head) * d_head**-0.5)

    def forward(self, q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
        T_q, T_k = q.shape[2], k.shape[2]
        hidden = torch.tanh(q.unsqueeze(3) + k.unsqueeze(2))  # (B, h, T_q, T_k, d)
        scores = torch.einsum("bhqkd,hd->bhqk", hidden, self.score)  # (B, h, T_q, T_k)
        mask = mask_and(mask, causal_mask(T_q, q.device, T_k) if causal else None)
        return _weighted(masked_softmax(scores, mask), v, dropout, need_weights)
