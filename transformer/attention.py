"""Masks, one multi-head attention, and the family of attention kinds behind it.

``MultiHeadAttention`` (Vaswani et al. 2017, Section 3.2.2) owns the learned projections and
the incremental-decoding cache. *How* a query scores keys and *which* keys it may see is a
small ``AttentionKind`` chosen by name (``model.attention`` in conf/model/transformer.yaml):

==============  ==========================================  ===========================
kind            paper, rule                                  time per head (n = length)
==============  ==========================================  ===========================
``scaled_dot``  Vaswani et al. 2017: softmax(q k^T / sqrt d)  O(n^2 d), fused SDPA kernel
``dot``         Luong et al. 2015: softmax(q k^T), no scale   O(n^2 d), fused SDPA kernel
``additive``    Bahdanau et al. 2014: w^T tanh(q_i + k_j)     O(n^2 d), memory O(n^2 d)
``local``       sliding window |i - j| <= w                   O(n w d)
``sparse``      Child et al. 2019: strided or fixed pattern   O(n (l + n/l) d), l = stride
``linear``      Katharopoulos et al. 2020: elu+1 feature map  O(n d^2)
==============  ==========================================  ===========================

This is the one place where masks are built. Convention: a bool mask, True = the query may
attend to that key; shapes broadcast to (B, h, T_q, T_k). Queries are aligned to the end of
the keys: with T_q < T_k (a decoder step after a cache), query i sits at position
T_k - T_q + i, and ``causal`` lets it see keys 0..that position. The kinds that run SDPA
(``SDPA_KINDS``) also take a key mask in its additive form, made once per forward pass
(``key_bias``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout

# -- masks ----------------------------------------------------------------------------------


def padding_mask(src_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool real-token mask -> (B, 1, 1, S) key mask for attention."""
    return src_mask[:, None, None, :]


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in for activations like ``x``: autocast's where it is on for
    x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, S) bool key mask -> the additive mask SDPA makes of it (0 where True, -inf
    where False), of ``dtype``.

    Given a bool mask, ``F.scaled_dot_product_attention`` converts it in every call, and its
    memory-efficient kernel copies a mask whose rows do not start at multiples of 16
    elements into one whose rows do: kernel launches in every attention layer of a step
    whose time on a GPU is mostly launches. Made once per forward pass, here, and laid out
    with rows 16 elements apart (a view of a (B, 1, 1, S rounded up to 16) buffer), every
    layer takes it as it is. ``ScaledDot`` accepts it wherever it accepts a bool mask.
    Under torch.compile the rows are S apart: the compiler lays out the mask for the kernel
    itself, and traced, the padded view made it compile one graph for S a multiple of 16
    and another for the rest (transformer/compiling.py)."""
    B, S = mask.shape[0], mask.shape[-1]
    row = S if torch.compiler.is_compiling() else -(-S // 16) * 16
    bias = torch.full((B, 1, 1, row), float("-inf"), dtype=dtype, device=mask.device)
    return bias[..., :S].masked_fill_(mask, 0.0)


def as_bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask as bool, True = attend; an additive mask (``key_bias``) is True where 0."""
    return mask if mask is None or mask.dtype == torch.bool else mask == 0


def _positions(T_q: int, T_k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions: queries (T_q, 1), aligned to the end of the keys; keys (1, T_k)."""
    i = torch.arange(T_k - T_q, T_k, device=device)[:, None]
    return i, torch.arange(T_k, device=device)[None, :]


def causal_mask(T: int, device=None, T_k: int | None = None) -> torch.Tensor:
    """(T, T_k) bool (T_k defaults to T): query t may see keys up to its own position."""
    i, j = _positions(T, T if T_k is None else T_k, device)
    return j <= i


def local_mask(T_q: int, T_k: int, window: int, causal: bool = False, device=None):
    """(T_q, T_k) bool: |i - j| <= window, and j <= i when causal."""
    i, j = _positions(T_q, T_k, device)
    allowed = (i - j).abs() <= window
    return allowed & (j <= i) if causal else allowed


def sparse_mask(
    T_q: int, T_k: int, pattern: str, stride: int, summary: int = 1, causal=False, device=None
):
    """(T_q, T_k) bool, the factorized patterns of Child et al. 2019 (Section 4.2), merged.

    ``strided``: |i - j| < l or (i - j) mod l = 0 (the previous l positions and every l-th one).
    ``fixed``: j in the block of i (floor(j / l) = floor(i / l)) or j among the last ``summary``
    positions of any block (j mod l >= l - c). With ``causal`` also j <= i; without, both
    patterns are applied symmetrically (an encoder).
    """
    i, j = _positions(T_q, T_k, device)
    if pattern == "strided":
        allowed = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    else:
        allowed = (i // stride == j // stride) | (j % stride >= stride - summary)
    return allowed & (j <= i) if causal else allowed


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a & b


def _is_key_mask(mask: torch.Tensor | None) -> bool:
    """None or a per-key mask (..., 1, T_k): the form the efficient paths accept."""
    return mask is None or (mask.dim() == 4 and mask.shape[-2] == 1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim where ``mask``; a row with no visible key gets all-zero
    weights (not NaN), e.g. a padded query whose whole window is padding."""
    if mask is None:
        return scores.softmax(-1)
    visible = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~visible, 0.0)
    return scores.softmax(-1) * visible


def _dropout(weights, p: float):
    return dropout(weights, p) if p > 0 else weights


def _weighted(weights, v, dropout: float, need_weights: bool):
    """(weights, dropped out) @ v, and the weights when asked for."""
    return _dropout(weights, dropout) @ v, (weights if need_weights else None)


def _explicit(q, k, v, mask, dropout: float, need_weights: bool, scale: float | None = None):
    """Dot-product attention with explicit (T_q, T_k) weights: for plots and general masks."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _weighted(
        masked_softmax(q @ k.transpose(-2, -1) * scale, mask), v, dropout, need_weights
    )


def _attend_subset(q, k, v, idx: torch.Tensor, need_weights: bool):
    """One decoder query (B, h, 1, d) over the keys at positions ``idx`` (1-D) of k, v
    (B, h, t, d), scaled dot-product; weights scattered back to (B, h, 1, t) if asked."""
    out, weights = _explicit(q, k[:, :, idx], v[:, :, idx], None, 0.0, True)
    if not need_weights:
        return out, None
    full = weights.new_zeros(*weights.shape[:-1], k.shape[2])  # (B, h, 1, t)
    full[..., idx] = weights
    return out, full


# -- the kinds ------------------------------------------------------------------------------


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
            mask = _and(as_bool(mask), causal_mask(T_q, q.device, T_k) if causal else None)
            return _explicit(q, k, v, mask, dropout, True, self.scale)
        # SDPA's own causal flag (top-left aligned) keeps the flash kernel eligible; one query
        # after a cache sees every key and needs no mask at all.
        is_causal = causal and T_q == T_k and mask is None
        if causal and T_q > 1 and not is_causal:
            mask = _and(as_bool(mask), causal_mask(T_q, q.device, T_k))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
        )
        return out, None


# Which CUDA kernels ``F.scaled_dot_product_attention`` may use (``trainer.sdpa_backends``).
SDPA_BACKENDS = {
    "flash": "enable_flash_sdp",  # FlashAttention-2: no attn_mask, so causal-only calls
    "efficient": "enable_mem_efficient_sdp",  # memory-efficient (CUTLASS), takes masks
    "cudnn": "enable_cudnn_sdp",  # cuDNN fused attention
    "math": "enable_math_sdp",  # the unfused matmul-softmax-matmul; always the last resort
}
# What ``auto`` (the default) allows on CUDA. On an H200 the memory-efficient kernel alone
# trained Transformer-base at 25k-token Multi30k batches 13-17% faster than torch's pick
# (cuDNN), and the Multi30k config at 4k tokens -1% and +9% in two runs
# (results/bench/train_speed_h200_sdpa_base.md, _rows_base.md, _sdpa_small.md, _rows_small.md)
AUTO_CUDA_SDPA = ("efficient",)


def use_sdpa_backends(names, device) -> list[str]:
    """Allow only the named SDPA kernels (a name or a list) on CUDA, process-wide; ``None``
    = all of them, and torch picks one per call; ``"auto"`` = ``AUTO_CUDA_SDPA``. ``math``
    stays allowed in every case, so a call that no fused kernel accepts still runs. Why it
    is a setting: on an H100, with Multi30k's 15-30-token sentences, the cuDNN kernel torch
    picked took 30% of the GPU time of a Transformer-base step
    (results/bench/profile_h100_eager.md), and ``bench/train_speed.py --sdpa`` measures the
    others. On any other ``device`` the names are checked and every kernel stays allowed:
    torch's CPU attention reads the same process-wide switches (flash off sends it to the
    slower math path). Returns the backends now allowed."""
    on_cuda = torch.device(device).type == "cuda"
    if names == "auto":
        names = list(AUTO_CUDA_SDPA)
    elif isinstance(names, str):
        names = [names]
    allowed = list(SDPA_BACKENDS) if names is None else [str(n) for n in names]
    unknown = [n for n in allowed if n not in SDPA_BACKENDS]
    if unknown or not allowed:
        raise ValueError(
            f"trainer.sdpa_backends: unknown {unknown or 'empty list'}; use auto, null or a "
            f"list of {list(SDPA_BACKENDS)}"
        )
    if not on_cuda:
        allowed = list(SDPA_BACKENDS)
    allowed = [n for n in SDPA_BACKENDS if n in allowed or n == "math"]
    for name, switch in SDPA_BACKENDS.items():
        getattr(torch.backends.cuda, switch)(name in allowed)
    return allowed


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
        mask = _and(mask, causal_mask(T_q, q.device, T_k) if causal else None)
        return _weighted(masked_softmax(scores, mask), v, dropout, need_weights)


def _key_visible(mask: torch.Tensor | None, pos: torch.Tensor, T_k: int) -> torch.Tensor:
    """(B', 1, *pos.shape) bool: the key at position ``pos`` exists and ``mask`` lets it be
    seen; ``mask`` is None or a key mask (B', 1, 1, T_k)."""
    inside = (pos >= 0) & (pos < T_k)
    if mask is None:
        return inside[None, None]
    return inside & mask[:, :, 0][:, :, pos.clamp(0, T_k - 1)]  # (B', 1, *pos.shape)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, T, d) zero-padded to m = ceil(T / size) blocks -> (B, h, m, size, d)."""
    B, h, T, d = x.shape
    m = -(-T // size)
    return F.pad(x, (0, 0, 0, m * size - T)).view(B, h, m, size, d)


def _unblock(x: torch.Tensor, T: int) -> torch.Tensor:
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
        self.visible = _unblock(_key_visible(mask, j.expand_as(visible), T) & visible, T)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) -> (B, h, m, K, d): each block's keys, zero outside 0..T-1."""
        m = -(-self.T // self.b)
        pad = (0, 0, self.left, m * self.b - self.T + self.right)
        return F.pad(x, pad).unfold(2, self.K, self.b).transpose(-1, -2)  # (B,h,m,d,K) -> K,d

    def scores(self, q, k) -> torch.Tensor:
        """(B, h, T, K) dot products of each query with its block's keys."""
        return _unblock(_blocks(q, self.b) @ self.keys(k).transpose(-1, -2), self.T)

    def output(self, weights, v) -> torch.Tensor:
        """weights (B, h, T, K) over the block keys' values -> (B, h, T, d)."""
        return _unblock(_blocks(weights, self.b) @ self.keys(v), self.T)  # (B,h,m,b,K)@(K,d)


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
        if need_weights or T_q != T_k or not _is_key_mask(mask):  # explicit (T_q, T_k)
            mask = _and(mask, local_mask(T_q, T_k, self.window, causal, q.device))
            return _explicit(q, k, v, mask, dropout, need_weights)
        band = _Band(T_q, self.window, 0 if causal else self.window, mask, q.device)
        weights = masked_softmax(band.scores(q, k) * scale, band.visible)  # (B, h, T, K)
        return band.output(_dropout(weights, dropout), v), None

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
    qr, kr, vr = (_blocks(x, st).transpose(2, 3) for x in (q, k, v))  # (B, h, st, m, d)
    m = qr.shape[3]
    s_res = qr @ kr.transpose(-2, -1) * scale  # (B, h, st, m, m): query a*st+r, key b*st+r
    s_res = _unblock(s_res.transpose(2, 3), T)  # (B, h, m, st, m) -> (B, h, T, m)
    i, b = torch.arange(T, device=q.device)[:, None], torch.arange(m, device=q.device)
    other = b < i // st if causal else b != i // st  # (T, m); j = i itself is in the band
    vis_res = _key_visible(mask, b * st + i % st, T) & other
    visible = torch.cat([band.visible, vis_res], -1)  # (B', 1, T, K + m)
    weights = masked_softmax(torch.cat([s_band, s_res], -1), visible)
    w_band, w_res = _dropout(weights, dropout).split([band.K, m], -1)
    w_res = _blocks(w_res, st).transpose(2, 3)  # (B, h, st, m, m)
    out_res = _unblock((w_res @ vr).transpose(2, 3), T)  # (B, h, st, m, d) -> (B, h, T, d)
    return band.output(w_band, v) + out_res


def _fixed(q, k, v, mask, causal: bool, st: int, c: int, dropout: float):
    """Fixed pattern, T_q = T_k = T, block length l = ``st``: the query's block of l keys plus
    the last c keys of every other block (the "summary" columns): a reshape into blocks and
    one dense product.
    """
    B, h, T, d = q.shape
    scale = d**-0.5
    qb, kb, vb = (_blocks(x, st) for x in (q, k, v))  # (B, h, m, st, d)
    m = qb.shape[2]
    s_blk = _unblock(qb @ kb.transpose(-2, -1) * scale, T)  # (B, h, m, st, st) -> (B, h, T, st)
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
    w_blk, w_sum = _dropout(weights, dropout).split([st, m * c], -1)
    out_blk = _unblock(_blocks(w_blk, st) @ vb, T)  # (B, h, m, st, st) @ (B, h, m, st, d)
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
        if need_weights or T_q != T_k or not _is_key_mask(mask):  # explicit (T_q, T_k)
            mask = _and(mask, self.mask(T_q, T_k, causal, q.device))
            return _explicit(q, k, v, mask, dropout, True)
        if self.pattern == "strided":
            return _strided(q, k, v, mask, causal, self.stride, dropout), None
        return _fixed(q, k, v, mask, causal, self.stride, self.summary, dropout), None

    def step_keys(self, t: int, device) -> torch.Tensor:
        return self.mask(1, t, True, device)[0].nonzero().squeeze(1)


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
    O(n d + (n / C) d^2) memory, where a per-position cumsum of S would need O(n d^2).
    """
    B, h, T, d = fq.shape
    C = min(chunk, T)
    fq, fk, v = (_blocks(x, C) for x in (fq, fk, v))  # (B, h, m, C, d)
    kv = fk.transpose(-2, -1) @ v  # (B, h, m, d, d_v) sum over each chunk
    z = fk.sum(3)  # (B, h, m, d)
    S = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2).cumsum(2)  # before chunk
    Z = torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, :-1]], 2).cumsum(2)  # (B, h, m, d)
    a = (fq @ fk.transpose(-2, -1)).tril()  # (B, h, m, C, C) causal inside the chunk
    num = fq @ S + a @ v  # (B, h, m, C, d_v)
    den = (fq @ Z.unsqueeze(-1)).squeeze(-1) + a.sum(-1)  # (B, h, m, C)
    return _unblock(num / den.clamp_min(eps).unsqueeze(-1), T)  # (B, h, T, d_v)


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
        # with n, and in fp16 den passes 65504 at a few hundred positions, where num / inf
        # gave rows of zeros without a NaN to show it (tests/test_attention_kinds.py)
        wide = _at_least_fp32(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            q_, k_, v_ = q.to(wide), k.to(wide), v.to(wide)
            out, weights = self._forward(q_, k_, v_, mask, causal, need_weights)
        return out.to(q.dtype), (None if weights is None else weights.to(q.dtype))

    def _forward(self, q, k, v, mask, causal, need_weights):
        T_q, T_k = q.shape[2], k.shape[2]
        fq, fk = elu_feature(q), elu_feature(k)
        if need_weights or not _is_key_mask(mask) or (causal and T_q != T_k):
            mask = _and(mask, causal_mask(T_q, q.device, T_k) if causal else None)
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


# -- configuration --------------------------------------------------------------------------

KINDS = ("scaled_dot", "dot", "additive", "local", "sparse", "linear")
SDPA_KINDS = ("scaled_dot", "dot")  # through F.scaled_dot_product_attention: take key_bias
CROSS_KINDS = ("scaled_dot", "dot", "additive", "linear")  # local/sparse need one axis
SPARSE_PATTERNS = ("strided", "fixed")


@dataclass(frozen=True)
class AttentionConfig:
    """``model.attention``: the kind of each attention role and the sizes of the patterns.

    The defaults repeat conf/model/transformer.yaml, for checkpoints made before it had the
    key. ``kind`` sets ``encoder`` and ``decoder`` (self-attention) when they are not given.
    """

    kind: str = "scaled_dot"
    encoder: str = "scaled_dot"  # encoder self-attention
    decoder: str = "scaled_dot"  # decoder causal self-attention
    cross: str = "scaled_dot"  # decoder over encoder
    window: int = 8  # local: keys |i - j| <= window
    sparse_pattern: str = "strided"  # sparse: strided | fixed
    stride: int = 8  # sparse: l
    summary: int = 1  # sparse fixed: c summary positions per block
    chunk: int = 64  # linear causal: prefix-sum chunk length


def attention_config(options: Mapping | None = None) -> AttentionConfig:
    """Validate a ``model.attention`` mapping of plain values; every error names its key."""
    if options is not None and not isinstance(options, Mapping):  # the RNN's is a name
        raise ValueError(
            f"model.attention={options!r}: the Transformer's attention is a group of "
            "settings; name its kind with model.attention.kind=NAME (or .encoder, .decoder, "
            ".cross)"
        )
    values = dict(options or {})
    names = [f.name for f in fields(AttentionConfig)]
    for key in values:
        if key not in names:
            raise ValueError(f"model.attention.{key} is not an option; allowed: {names}")
    if "kind" in values:
        values.setdefault("encoder", values["kind"])
        values.setdefault("decoder", values["kind"])
    cfg = AttentionConfig(**values)
    roles = {"kind": KINDS, "encoder": KINDS, "decoder": KINDS, "cross": CROSS_KINDS}
    for role, allowed in roles.items():
        value = getattr(cfg, role)
        if value not in allowed:
            why = " (local and sparse are for self-attention)" if value in KINDS else ""
            raise ValueError(f"model.attention.{role}={value!r} must be one of {allowed}{why}")
    if cfg.sparse_pattern not in SPARSE_PATTERNS:
        raise ValueError(
            f"model.attention.sparse_pattern={cfg.sparse_pattern!r} must be one of "
            f"{SPARSE_PATTERNS}"
        )
    for key in ("window", "stride", "chunk", "summary"):
        value = getattr(cfg, key)
        # a bool is an int to Python: window=true passed as 1 and failed in the first forward
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.attention.{key} must be a positive integer, got {value!r}")
    # Both patterns let every query see every key at stride 1 (strided: every key is a
    # multiple of 1 away; fixed: every key is a summary key), and the fixed one at c = l:
    # full attention at a sparse price, with nothing to say so
    if cfg.stride < 2:
        raise ValueError(
            f"model.attention.stride={cfg.stride} makes sparse attention full attention: "
            "use 2 or more (or the kind scaled_dot)"
        )
    if cfg.summary >= cfg.stride:
        raise ValueError(
            f"model.attention.summary={cfg.summary} must be below "
            f"model.attention.stride={cfg.stride}: with every position of a block a summary "
            "position, the fixed pattern is full attention"
        )
    return cfg


def ignored_options(cfg: AttentionConfig) -> list[str]:
    """Why each setting of ``cfg`` moved from its default means nothing here, naming its
    key: a pattern size that no role's kind reads (a window without local attention, a
    stride without sparse attention, a summary without the fixed pattern, a chunk without
    a linear decoder self-attention: only its causal prefix sums have chunks), or a
    ``kind`` that both self-attention roles override. Empty when every setting counts.
    Training refuses these (trainer.py); a model built from a checkpoint does not."""
    roles = {"encoder": cfg.encoder, "decoder": cfg.decoder, "cross": cfg.cross}
    kinds = ", ".join(f"{role}={kind}" for role, kind in roles.items())
    sparse = "sparse" in roles.values()
    readers = {  # key: (read here, what reads it, the setting that makes it read)
        "window": ("local" in roles.values(), "local attention", "kind=local"),
        "sparse_pattern": (sparse, "sparse attention", "kind=sparse"),
        "stride": (sparse, "sparse attention", "kind=sparse"),
        "summary": (
            sparse and cfg.sparse_pattern == "fixed", "the fixed sparse pattern",
            "sparse_pattern=fixed",
        ),
        "chunk": (cfg.decoder == "linear", "linear decoder self-attention", "decoder=linear"),
    }  # fmt: skip
    default, found = AttentionConfig(), []
    if cfg.kind != default.kind and cfg.kind not in (cfg.encoder, cfg.decoder):
        found.append(
            f"model.attention.kind={cfg.kind} sets no role ({kinds} are given): leave it out"
        )
    for key, (read, reader, setting) in readers.items():
        if not read and getattr(cfg, key) != getattr(default, key):
            found.append(
                f"model.attention.{key}={getattr(cfg, key)} is for {reader}, which no role "
                f"uses ({kinds}): leave it out, or set model.attention.{setting}"
            )
    return found


def make_kind(name: str, n_heads: int, d_head: int, cfg: AttentionConfig) -> AttentionKind:
    """The ``AttentionKind`` called ``name`` (one of ``KINDS``), sized by ``cfg``."""
    builders = {
        "scaled_dot": ScaledDot,
        "dot": Dot,
        "additive": lambda: Additive(n_heads, d_head),
        "local": lambda: Local(cfg.window),
        "sparse": lambda: Sparse(cfg.sparse_pattern, cfg.stride, cfg.summary),
        "linear": lambda: Linear(cfg.chunk),
    }
    if name not in builders:
        raise ValueError(f"attention kind {name!r} must be one of {KINDS}")
    return builders[name]()


# -- multi-head attention -------------------------------------------------------------------


def stacked_from(name: str) -> list[str] | None:
    """The names of the separate ``q_proj``, ``k_proj``, ``v_proj`` parameters that the
    ``in_proj`` parameter ``name`` stacks (in a checkpoint from before they were stacked);
    None for any other parameter."""
    prefix, found, kind = name.rpartition("in_proj.")
    if not found or kind not in ("weight", "bias"):
        return None
    return [f"{prefix}{p}_proj.{kind}" for p in "qkv"]


def _stack_qkv(state_dict, prefix, *_):
    """Load a checkpoint written with separate ``q_proj``, ``k_proj``, ``v_proj`` layers."""
    for t in ("weight", "bias"):
        keys = stacked_from(f"{prefix}in_proj.{t}")
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}in_proj.{t}"] = torch.cat([state_dict.pop(k) for k in keys])


class MultiHeadAttention(nn.Module):
    """h parallel heads over learned projections, then an output projection (Section 3.2.2).

    The projections and the cache live here; the score and pattern are the ``kind``'s.
    Supports self-attention, cross-attention and incremental decoding: ``forward`` may be
    given a ``cache`` of previously projected keys/values (or a linear-attention state), in
    which case the step updates it (self-attention) or uses it as it is (cross-attention).

    :param kind: one of ``KINDS``  :param options: pattern sizes (window, stride, ...)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        kind: str = "scaled_dot",
        options: AttentionConfig | None = None,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        # W_q, W_k, W_v stacked (3 D, D): self-attention projects x in one matrix product,
        # cross-attention takes the query rows for x and the key/value rows for the memory.
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self._register_load_state_dict_pre_hook(_stack_qkv)
        self.kind = make_kind(kind, n_heads, self.d_head, options or AttentionConfig())
        self.need_weights = False  # True keeps the last weights (plots); explicit path
        self.last_weights: torch.Tensor | None = None

    def xavier_init(self) -> None:
        """Xavier-uniform for each of W_q, W_k, W_v and W_o on its own (the D x D fans that
        separate layers would have), zero biases: the Transformer's initialisation."""
        for w in (*self.in_proj.weight.detach().chunk(3), self.out_proj.weight.detach()):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, h, T, d_head)

    def project(self, x: torch.Tensor, params, n: int) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) through ``params`` (weight, bias), n blocks of D rows (of the stacked
        projection, or of several layers' alike) -> n (B, h, T, d_head)."""
        y = F.linear(x, *params)  # (B, T, n D)
        return tuple(self.split_heads(part) for part in y.chunk(n, dim=-1))

    def split_params(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """((W_q, b_q), (W_kv, b_kv)): the query rows and the key/value rows of the stacked
        projection, each parameter split in one operation. Cross-attention projects the
        memory and the queries apart; when one pass uses both parts of one split, the
        backward pass joins their gradients in one concatenation per parameter. (A slice of
        each part costs the backward pass a zero-filled gradient of the full size and a copy,
        per part and parameter, then an addition: ten operators per layer, not two.)"""
        D = self.d_head * self.n_heads
        (w_q, w_kv), (b_q, b_kv) = (p.split([D, 2 * D]) for p in self.in_proj.parameters())
        return (w_q, b_q), (w_kv, b_kv)

    def project_q(self, x: torch.Tensor, params=None) -> torch.Tensor:
        """Queries of ``x`` (B, T, D) -> (B, h, T, d_head); ``params``: the (W_q, b_q) of a
        ``split_params`` whose key/value rows the same pass uses, else split here."""
        return self.project(x, self.split_params()[0] if params is None else params, 1)[0]

    def project_kv(self, x: torch.Tensor, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x`` (B, T, D) -> two (B, h, T, d_head); ``params`` as in
        ``project_q``, the (W_kv, b_kv)."""
        return self.project(x, self.split_params()[1] if params is None else params, 2)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values of ``x`` (B, T, D), one matrix product -> three
        (B, h, T, d_head). The whole parameters, not a slice of them (see split_params)."""
        return self.project(x, (self.in_proj.weight, self.in_proj.bias), 3)

    def empty_cache(self, B: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder self-attention cache before the first step (a pair, batch first)."""
        return self.kind.empty_cache(B, self.n_heads, self.d_head, like)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        append_kv: bool = False,
        causal: bool = False,
        q_params: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """
        :param x: (B, T_q, D) queries (and keys/values for self-attention)
        :param memory: (B, T_k, D) keys/values source for cross-attention; None = self
        :param mask: bool broadcastable to (B, h, T_q, T_k), True = attend
        :param kv: the cache: cached (k, v), each (B, h, T_cached, d_head), or the kind's state
        :param append_kv: True for incremental self-attention: the kind's ``step`` updates
            ``kv`` with this position; False with ``kv`` given: ``kv`` is used as is
            (precomputed cross-attention keys and values)
        :param causal: full-sequence causal self-attention (training / teacher forcing)
        :param q_params: cross-attention: (W_q, b_q) of the ``split_params`` that gave the
            cached keys and values (``project_q``); None = split here
        :return: output (B, T_q, D) and the cache, for the caller
        """
        B, T, D = x.shape
        if kv is not None and append_kv:  # one more position of self-attention
            q, k_new, v_new = self.project_qkv(x)  # (B, h, T_q, d_head) each
            out, kv, weights = self.kind.step(q, k_new, v_new, kv, self.need_weights)
        else:
            if kv is None and memory is None:  # self-attention
                q, k, v = self.project_qkv(x)
            else:  # cross-attention: keys and values of the memory, or its cache
                q = self.project_q(x, q_params)
                k, v = self.project_kv(memory) if kv is None else kv
            p = self.dropout if self.training else 0.0
            out, weights = self.kind(q, k, v, mask, causal, p, self.need_weights)
            kv = (k, v)
        if self.need_weights:
            self.last_weights = weights  # (B, h, T_q, T_k), None for a linear decoder step
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T_q, D)
        return self.out_proj(out), kv
