"""Masks and multi-head scaled dot-product attention (Vaswani et al. 2017, Section 3.2).

This is the one place where masks are built. Convention: a bool mask, True = the query
may attend to that key. Shapes broadcast to (B, h, T_q, T_k).

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed by
``torch.nn.functional.scaled_dot_product_attention`` so the fused kernels run on a GPU.
Cost: O(n^2 d) time per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def padding_mask(src_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool real-token mask -> (B, 1, 1, S) key mask for attention."""
    return src_mask[:, None, None, :]


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(T, T) bool, True on and below the diagonal: query t may see keys 0..t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def reference_attention(q, k, v, mask=None, scale: float | None = None):
    """Direct softmax(q k^T * scale) v, returning (output, weights); the test oracle.

    :param q: (..., T_q, d)  :param k, v: (..., T_k, d)  :param mask: bool, True = attend
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """h parallel scaled dot-product heads over learned projections, then an output projection.

    Supports self-attention, cross-attention and incremental decoding: ``forward`` may be
    given a ``cache`` of previously projected keys/values, in which case the new keys/values
    are appended (self-attention) or the cached ones are used as they are (cross-attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.need_weights = False  # set True to keep the last weights (plots); uses math path
        self.last_weights: torch.Tensor | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, h, T, d_head)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x`` (B, T, D) -> two (B, h, T, d_head)."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """q (B,h,Tq,dh), k/v (B,h,Tk,dh), mask broadcastable bool -> (B, h, Tq, dh).

        ``causal`` (only with T_q == T_k) lets SDPA build the causal mask itself, which keeps
        the flash kernel eligible on a GPU. Decoder padding needs no mask: pads come last,
        so a causal query never sees them before its own position and their outputs are
        ignored by the loss.
        """
        if self.need_weights:
            if causal:
                mask = causal_mask(q.shape[2], q.device)
            out, self.last_weights = reference_attention(q, k, v, mask)
            return out
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
        )

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        append_kv: bool = False,
        causal: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """
        :param x: (B, T_q, D) queries (and keys/values for self-attention)
        :param memory: (B, T_k, D) keys/values source for cross-attention; None = self
        :param mask: bool broadcastable to (B, h, T_q, T_k), True = attend
        :param kv: cached (k, v), each (B, h, T_cached, d_head)
        :param append_kv: True for incremental self-attention: new k/v are appended to ``kv``;
            False with ``kv`` given: ``kv`` is used as is (precomputed cross-attention)
        :param causal: full-sequence causal self-attention (training / teacher forcing)
        :return: output (B, T_q, D) and the (k, v) used, for the caller's cache
        """
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, h, T_q, d_head)
        if kv is None:
            k, v = self.project_kv(x if memory is None else memory)
        elif append_kv:
            k_new, v_new = self.project_kv(x)
            k, v = torch.cat([kv[0], k_new], dim=2), torch.cat([kv[1], v_new], dim=2)
        else:
            k, v = kv
        out = self.attend(q, k, v, mask, causal)  # (B, h, T_q, d_head)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T_q, D)
        return self.out_proj(out), (k, v)
