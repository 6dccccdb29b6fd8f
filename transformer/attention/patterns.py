"""The kinds that see only some keys, computed without the (T_q, T_k) weights: local
(sliding window) and sparse (Child et al. 2019, strided and fixed) attention, by blocks of
queries, reshapes and unfolds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kinds import AttentionKind, drop_weights, explicit_attention
from .masks import is_key_mask, local_mask, mask_and, masked_softmax, sparse_mask


def _key_visible(mask: torch.Tensor | None, pos: torch.Tensor, T_k: int) -> torch.Tensor:
    """(B', 1, *pos.shape) bool: the key at position ``pos`` exists and ``mask`` lets it be
    seen; ``mask`` is None or a key mask (B', 1, 1, T_k)."""
    inside = (pos >= 0) & (pos < T_k)
    if mask is None:
        return inside[None, None]
    return inside & mask[:, :, 0][:, :, pos.clamp(0, T_k - 1)]  # (B', 1, *pos.shape)


def blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, T, d) zero-padded to m = ceil(T / size) blocks -> (B, h, m, size, d)."""
    B, h, T, d = x.shape
    m = -(-T // size)
    return F.pad(x, (0, 0, 0, m * size - T)).view(B, h, m, size, d)


def unblock(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, h, m, size, ...) in position order -> (B, h, T, ...), padding dropped."""
    return x.flatten(2, 3)[:, :, :T]


class _Band:
    """Band attention by blocks, T_q = T_k = T: query i may see keys i - left .. i + right.

    Queries go in blocks of b; block a shares the keys a b - left .. a b + b - 1 + right
    (K = b + left + right of them, an unfold of the padded keys), so the scores are one
    batched (b, d) x (d, K) product per block instead of one tiny product per query:
    O(n K d) time and O(n K) scores with b ~ max(left, right), i.e. O(n w d).
    """

    def __init__(self, T: int, left: int, right: int, mask, device):
        self.T, self.left, self.right = T, min(left, T - 1), min(right, T - 1)
        self.b = min(T, max(self.left, self.right, 16))
        m = -(-T // self.b)
        self.K = self.b + self.left + self.right
        i = torch.arange(m, device=device)[:, None] * self.b + torch.arange(self.b, device=device)
        j = i[:, :1] - self.left + torch.arange(self.K, device=device)  # (m, K) key positions
        i, j = i[:, :, None], j[:, None, :]  # (m, b, 1) query and (m, 1, K) key positions
        visible = (j >= i - self.left) & (j <= i + self.right)  # (m, b, K)
        self.visible = unblock(_key_visible(mask, j.expand_as(visible), T) & visible, T)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) -> (B, h, m, K, d): each block's keys, zero outside 0..T-1."""
        m = -(-self.T // self.b)
        pad = (0, 0, self.left, m * self.b - self.T + self.right)
        return F.pad(x, pad).unfold(2, self.K, self.b).transpose(-1, -2)  # (B,h,m,d,K) -> K,d

    def scores(self, q, k) -> torch.Tensor:
        """(B, h, T, K) dot products of each query with its block's keys."""
        return unblock(blocks(q, self.b) @ self.keys(k).transpose(-1, -2), self.T)

    def output(self, weights, v) -> torch.Tensor:
        """weights (B, h, T, K) over the block keys' values -> (B, h, T, d)."""
        return unblock(blocks(weights, self.b) @ self.keys(v), self.T)  # (B,h,m,b,K)@(K,d)


class Local(AttentionKind):
    """Sliding-window attention: query i sees keys |i - j| <= w (j <= i when causal), with
    scaled dot-product scores; the fixed window of Luong et al. 2015's local attention, used
    as self-attention (Beltagy et al. 2020, Longformer). O(n w d) time and memory, computed
    by blocks of queries (``_Band``). A decoder step attends to the last w + 1 keys.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
        T_q, T_k, scale = q.shape[2], k.shape[2], q.shape[-1] ** -0.5
        if need_weights or T_q != T_k or not is_key_mask(mask):  # explicit (T_q, T_k)
            mask = mask_and(mask, local_mask(T_q, T_k, self.window, causal, q.device))
            return explicit_attention(q, k, v, mask, dropout, need_weights)
        band = _Band(T_q, self.window, 0 if causal else self.window, mask, q.device)
        weights = masked_softmax(band.scores(q, k) * scale, band.visible)  # (B, h, T, K)
        return band.output(drop_weights(weights, dropout), v), None

    def step_keys(self, t: int, device) -> torch.Tensor:
        return torch.arange(max(0, t - self.window - 1), t, device=device)  # the last w + 1


def _strided(q, k, v, mask, causal: bool, st: int, dropout: float):
    """Strided pattern, T_q = T_k = T, stride l = ``st``: a band |i - j| < l plus the keys
    j = i (mod l). The band is computed by blocks as in ``Local``; the residue classes are a
    reshape: position a * l + r goes to class r, slot a, so each class is a small dense
    (m, m) attention, m = ceil(T / l).
    """
    B, h, T, d = q.shape
    scale = d**-0.5
    band = _Band(T, st - 1, 0 if causal else st - 1, mask, q.device)
    s_band = band.scores(q, k) * scale  # (B, h, T, K)
    qr, kr, vr = (blocks(x, st).transpose(2, 3) for x in (q, k, v))  # (B, h, st, m, d)
    m = qr.shape[3]
    s_res = qr @ kr.transpose(-2, -1) * scale  # (B, h, st, m, m): query a*st+r, key b*st+r
    s_res = unblock(s_res.transpose(2, 3), T)  # (B, h, m, st, m) -> (B, h, T, m)
    i, b = torch.arange(T, device=q.device)[:, None], torch.arange(m, device=q.device)
    other = b < i // st if causal else b != i // st  # (T, m); j = i itself is in the band
    vis_res = _key_visible(mask, b * st + i % st, T) & other
    visible = torch.cat([band.visible, vis_res], -1)  # (B', 1, T, K + m)
    weights = masked_softmax(torch.cat([s_band, s_res], -1), visible)
    w_band, w_res = drop_weights(weights, dropout).split([band.K, m], -1)
    w_res = blocks(w_res, st).transpose(2, 3)  # (B, h, st, m, m)
    out_res = unblock((w_res @ vr).transpose(2, 3), T)  # (B, h, st, m, d) -> (B, h, T, d)
    return band.output(w_band, v) + out_res


def _fixed(q, k, v, mask, causal: bool, st: int, c: int, dropout: float):
    """Fixed pattern, T_q = T_k = T, block length l = ``st``: the query's block of l keys plus
    the last c keys of every other block (the "summary" columns): a reshape into blocks and
    one dense product.
    """
    B, h, T, d = q.shape
    scale = d**-0.5
    qb, kb, vb = (blocks(x, st) for x in (q, k, v))  # (B, h, m, st, d)
    m = qb.shape[2]
    s_blk = unblock(qb @ kb.transpose(-2, -1) * scale, T)  # (B, h, m, st, st) -> (B, h, T, st)
    i, s = torch.arange(T, device=q.device)[:, None], torch.arange(st, device=q.device)
    pos_blk = i // st * st + s  # (T, st) key position in each slot of the query's block
    vis_blk = _key_visible(mask, pos_blk, T) & ((pos_blk <= i) if causal else True)
    ks, vs = (x[:, :, :, st - c :].flatten(2, 3) for x in (kb, vb))  # (B, h, m*c, d)
    s_sum = q @ ks.transpose(-2, -1) * scale  # (B, h, T, m*c)
    u = torch.arange(m * c, device=q.device)
    pos_sum = u // c * st + st - c + u % c  # (m*c,) positions of the summary keys
    other = u // c < i // st if causal else u // c != i // st  # (T, m*c); own block is above
    vis_sum = _key_visible(mask, pos_sum.expand(T, -1), T) & other
    weights = masked_softmax(torch.cat([s_blk, s_sum], -1), torch.cat([vis_blk, vis_sum], -1))
    w_blk, w_sum = drop_weights(weights, dropout).split([st, m * c], -1)
    out_blk = unblock(blocks(w_blk, st) @ vb, T)  # (B, h, m, st, st) @ (B, h, m, st, d)
    return out_blk + w_sum @ vs


class Sparse(AttentionKind):
    """Factorized sparse attention of Child et al. 2019 (Section 4.2), the two factors merged
    into one head: ``strided`` (the previous l positions and every l-th one before them) or
    ``fixed`` (the query's block of l positions and the last c positions of every block);
    ``sparse_mask`` defines both. O(n (l + n/l) d) time, O(n sqrt(n) d) for l = sqrt(n),
    computed with reshapes and unfolds (no per-element gather). A decoder step attends to
    the positions the pattern allows (O(l + n/l) keys).
    """

    def __init__(self, pattern: str, stride: int, summary: int = 1):
        super().__init__()
        self.pattern, self.stride, self.summary = pattern, stride, summary

    def mask(self, T_q: int, T_k: int, causal: bool, device=None) -> torch.Tensor:
        return sparse_mask(T_q, T_k, self.pattern, self.stride, self.summary, causal, device)

    def forward(self, q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
        T_q, T_k = q.shape[2], k.shape[2]
        if need_weights or T_q != T_k or not is_key_mask(mask):  # explicit (T_q, T_k)
            mask = mask_and(mask, self.mask(T_q, T_k, causal, q.device))
            return explicit_attention(q, k, v, mask, dropout, True)
        if self.pattern == "strided":
            return _strided(q, k, v, mask, causal, self.stride, dropout), None
        return _fixed(q, k, v, mask, causal, self.stride, self.summary, dropout), None

    def step_keys(self, t: int, device) -> torch.Tensor:
        return self.mask(1, t, True, device)[0].nonzero().squeeze(1)
