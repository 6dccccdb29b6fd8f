"""Attention masks, the one place they are built. Convention: a bool mask, True = the query
may attend to that key; shapes broadcast to (B, h, T_q, T_k). Queries are aligned to the end
of the keys: with T_q < T_k (a decoder step after a cache), query i sits at position
T_k - T_q + i, and ``causal`` lets it see keys 0..that position. The kinds that run SDPA
also take a key mask in its additive form, made once per forward pass (``key_bias``).
"""

from __future__ import annotations

import torch


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


def mask_and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a & b


def is_key_mask(mask: torch.Tensor | None) -> bool:
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
