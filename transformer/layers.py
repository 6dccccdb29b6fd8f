"""Transformer building blocks (Vaswani et al. 2017, Sections 3.1-3.5).

ScaledEmbedding (embeddings times sqrt(d_model), 3.4), SinusoidalPositions (3.5),
FeedForward (FFN(x) = max(0, x W1 + b1) W2 + b2, 3.3), EncoderLayer and DecoderLayer with
residual connections around each sublayer and layer norm, either before the sublayer
(pre-norm, the default: stabler without long warmup) or after it (post-norm, the paper).
Each attention sublayer uses the kind its role names in ``AttentionConfig`` (attention/config.py):
``encoder`` self-attention, ``decoder`` causal self-attention, ``cross`` attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import AttentionConfig, MultiHeadAttention
from .dropout import Dropout


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by sqrt(d_model)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * math.sqrt(self.embedding_dim)

    def lookup(self, *ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The embeddings of several id tensors, each (*its shape, D), from one lookup: the
        backward pass then scatters all their gradients into the table at once."""
        flat = self(torch.cat([i.reshape(-1) for i in ids]))  # (sum of sizes, D)
        parts = flat.split([i.numel() for i in ids])
        return tuple(part.view(*i.shape, -1) for part, i in zip(parts, ids))


class SinusoidalPositions(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), added to embeddings."""

    def __init__(self, d_model: int, max_positions: int):
        super().__init__()
        pos = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (P, 1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_positions, d_model)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])  # odd d: one cosine fewer
        self.register_buffer("pe", pe, persistent=False)  # (P, D)

    def forward(self, x: torch.Tensor, start: int = 0, index=None) -> torch.Tensor:
        """x (B, T, D) -> x + PE[start:start+T], or x + PE[index] for positions ``index``
        (B, T) (packed rows, where each sentence counts from 0 in its own slots)."""
        if index is not None:
            return x + self.pe[index].to(x.dtype)
        T = x.shape[1]
        if start + T > self.pe.shape[0]:
            raise ValueError(
                f"sequence of {start + T} positions exceeds model.max_positions={self.pe.shape[0]}"
            )
        return x + self.pe[start : start + T].to(x.dtype)


class FeedForward(nn.Module):
    """Position-wise two-layer network with ReLU; ``act_dropout`` after the activation."""

    def __init__(self, d_model: int, d_ff: int, act_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act_dropout = Dropout(act_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_dropout(torch.relu(self.fc1(x))))


class Sublayer(nn.Module):
    """Residual wrapper: pre-norm x + f(LN(x)), or post-norm LN(x + f(x)); dropout on f."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, fn) -> tuple[torch.Tensor, object]:
        """``fn`` maps (B, T, D) to (output, aux); returns (new x, aux)."""
        if self.pre_norm:
            out, aux = fn(self.norm(x))
            return x + self.dropout(out), aux
        out, aux = fn(x)
        return self.norm(x + self.dropout(out)), aux


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(
        self, d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm, attention=None
    ):
        super().__init__()
        att = attention or AttentionConfig()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, att.encoder, att)
        self.ffn = FeedForward(d_model, d_ff, act_dropout)
        self.sub_attn = Sublayer(d_model, dropout, pre_norm)
        self.sub_ffn = Sublayer(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D)."""
        x, _ = self.sub_attn(x, lambda h: self.self_attn(h, mask=mask))
        x, _ = self.sub_ffn(x, lambda h: (self.ffn(h), None))
        return x


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder memory, feed-forward."""

    def __init__(
        self, d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm, attention=None
    ):
        super().__init__()
        att = attention or AttentionConfig()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, att.decoder, att)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, att.cross, att)
        self.ffn = FeedForward(d_model, d_ff, act_dropout)
        self.sub_self = Sublayer(d_model, dropout, pre_norm)
        self.sub_cross = Sublayer(d_model, dropout, pre_norm)
        self.sub_ffn = Sublayer(d_model, dropout, pre_norm)

    def forward(
        self, x, memory, memory_mask, self_kv=None, cross_kv=None, cross_q=None, self_mask=None
    ):
        """
        :param x: (B, T, D) target states; T = 1 when decoding incrementally with ``self_kv``
        :param memory: (B, S, D) encoder output
        :param memory_mask: (B, 1, 1, S), or (B, 1, T, S) for packed rows
        :param self_mask: training only: the self-attention mask, causal included, in place
            of the causal flag (packed rows: ``packing.segment_bias``); None = causal
        :param self_kv: self-attention cache of earlier positions (k, v), or a linear
            attention state; None when training
        :param cross_kv: precomputed cross-attention (k, v), or None
        :param cross_q: the cross-attention's (W_q, b_q) split with the rows that made
            ``cross_kv`` (``MultiHeadAttention.split_params``), or None
        :return: (B, T, D), new self (k, v), cross (k, v)
        """
        incremental = self_kv is not None
        x, self_kv = self.sub_self(
            x,
            lambda h: self.self_attn(
                h,
                mask=self_mask,
                kv=self_kv,
                append_kv=incremental,
                causal=not incremental and self_mask is None,
            ),
        )
        x, cross_kv = self.sub_cross(
            x,
            lambda h: self.cross_attn(
                h, memory=memory, mask=memory_mask, kv=cross_kv, q_params=cross_q
            ),
        )
        x, _ = self.sub_ffn(x, lambda h: (self.ffn(h), None))
        return x, self_kv, cross_kv
