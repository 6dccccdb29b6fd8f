"""Packed rows: several sentence pairs to a row of a batch, kept apart by segment ids.

Multi30k's sentences are 10-30 tokens long, so a 25k-token batch is over a thousand short
rows, and an attention kernel that tiles a row's queries in blocks of 64 or 128 spends most
of every tile on nothing (bench/attention_kernels.py measures it). Laid out several to a
row, the same pairs fill the tiles; each query then sees only the keys of its own sentence,
through a block-diagonal additive mask (``segment_bias``) instead of a key mask.

The layout takes the pairs of a padded batch in order; each goes to the first of the last
``OPEN_ROWS`` rows started where both its source and its target fit, else starts a row. The
rows are ``width`` slots wide on each side (or the longest sentence of that side, if
longer), rounded up to 16 so that the mask's rows are aligned for the memory-efficient
kernel. A slot holds a token of one sentence (segment = the pair's index in the batch + 1,
and its position in the sentence) or nothing (segment 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 16  # slots per row are a multiple of this (the efficient kernel's mask rows)
# The rows a pair may join: the last 4 started. More rows fill a little better and take more
# host time: results/bench/packed_fill_cpu.md compares 1, 4 and all
OPEN_ROWS = 4
# The width ``trainer.packed_rows=auto`` packs to on CUDA. On an H200, rows of 128 trained
# Transformer-base at 25k-token Multi30k batches 21-33% faster than padded batches in three
# runs over two calls (256: +27%); the Multi30k config at 4k was 17-30% faster in the first
# call and 5-6% slower in the second (results/bench/README.md#on-an-h200-2026-12-04); on the
# CPU, whose attention is the unfused math path, rows are slower
# (results/bench/train_speed_cpu_packed_rows.md)
AUTO_CUDA_WIDTH = 128
# ``auto`` packs a corpus only if its training pairs average at least this many to a row.
# Multi30k de-en's training pairs (17.1 slots, ``mean_pair_len``: 7.5 to a row of 128)
# trained Transformer-base faster in rows on an H200; its pairs joined 2 at a time (32.6
# slots: 3.9 a row) were 7% slower to 3% faster, and joined 4 (63.3: 2 a row) 9-16% slower
# (results/bench/train_speed_h200_join{2,4}.md): each query attends over its whole row,
# masked, and a row of few long pairs leaves more slots empty (the mean_pair_len figures and
# the rows' fill: results/bench/packed_fill_cpu_join{1,2,4}.md)
MIN_PAIRS_PER_ROW = 4


def mean_pair_len(src_len, tgt_len) -> float:
    """The mean over sentence pairs of the longer side's slots in a row (with EOS or BOS:
    one more than the sentence's tokens); how many pairs a row holds."""
    src_len, tgt_len = (np.asarray(x, dtype=np.int64) for x in (src_len, tgt_len))
    if len(src_len) == 0:
        return 0.0
    return float(np.maximum(src_len, tgt_len).mean()) + 1.0


def resolve_width(setting, takes_rows: bool, device, pair_len: float | None = None) -> int:
    """``trainer.packed_rows``: ``"auto"`` is ``AUTO_CUDA_WIDTH`` on CUDA for a model that
    takes rows (the Transformer with SDPA attention) and training pairs of ``pair_len``
    slots on average (``mean_pair_len``; None: not known, taken as short) that fit at least
    ``MIN_PAIRS_PER_ROW`` to a row; else 0 (padded batches). A number is itself."""
    if setting != "auto":
        return int(setting)
    if not takes_rows or torch.device(device).type != "cuda":
        return 0
    if pair_len is not None and pair_len * MIN_PAIRS_PER_ROW > AUTO_CUDA_WIDTH:
        return 0
    return AUTO_CUDA_WIDTH


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class RowLayout:
    """Where each pair of a padded batch of B pairs goes: its row and the first slot of its
    source and of its target in that row."""

    row: np.ndarray  # (B,) int64
    src_offset: np.ndarray  # (B,) int64
    tgt_offset: np.ndarray  # (B,) int64
    rows: int
    src_width: int
    tgt_width: int


def row_layout(src_len, tgt_len, width: int, open_rows: int = OPEN_ROWS) -> RowLayout:
    """Pairs of source and target lengths (B each), in order, into rows of ``width`` slots
    a side (or the side's longest sentence, rounded up to 16): a pair goes to the first of
    the last ``open_rows`` rows where both its sides fit, else it starts a new row."""
    src_len, tgt_len = (np.asarray(x, dtype=np.int64) for x in (src_len, tgt_len))
    if width < 1:
        raise ValueError(f"packed rows need a width of at least 1 slot, got {width}")
    if len(src_len) != len(tgt_len) or len(src_len) == 0:
        raise ValueError(f"row_layout: {len(src_len)} sources and {len(tgt_len)} targets")
    ws = round_up(max(width, int(src_len.max())))
    wt = round_up(max(width, int(tgt_len.max())))
    B = len(src_len)
    row, so, to = (np.empty(B, dtype=np.int64) for _ in range(3))
    used_s, used_t = [], []  # slots taken in each row so far
    for i, (s, t) in enumerate(zip(src_len.tolist(), tgt_len.tolist())):
        for r in range(max(0, len(used_s) - open_rows), len(used_s)):
            if used_s[r] + s <= ws and used_t[r] + t <= wt:
                break
        else:
            r = len(used_s)
            used_s.append(0)
            used_t.append(0)
        row[i], so[i], to[i] = r, used_s[r], used_t[r]
        used_s[r] += s
        used_t[r] += t
    return RowLayout(row, so, to, len(used_s), ws, wt)


@dataclass(frozen=True)
class PackedSide:
    """One side (source or target) of a batch in packed rows.

    ``real`` (n,) int64: the flat slots (of R * W) that hold tokens, and ``index`` (n,)
    their flat positions in the padded (B, L) layout, in that layout's order; ``segment``
    (R, W) the pair's index + 1 (0 empty); ``position`` (R, W) the token's position in its
    sentence (0 empty).
    """

    real: torch.Tensor
    index: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment.shape)

    def pack(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(B, L, ...) padded -> (R, W, ...) packed; empty slots get ``fill``."""
        R, W = self.shape
        flat = x.reshape(-1, *x.shape[2:])
        out = flat.new_full((R * W, *x.shape[2:]), fill)
        out[self.real] = flat[self.index]
        return out.view(R, W, *x.shape[2:])

    def unpack(self, x: torch.Tensor, B: int, L: int, fill=0) -> torch.Tensor:
        """(R, W, ...) packed -> (B, L, ...) padded; padding gets ``fill``."""
        flat = x.reshape(-1, *x.shape[2:])
        out = flat.new_full((B * L, *x.shape[2:]), fill)
        out[self.index] = flat[self.real]
        return out.view(B, L, *x.shape[2:])


def packed_side(lengths, row, offset, rows: int, width: int, L: int, device=None) -> PackedSide:
    """The packing of one side of a layout: sentence i (``lengths[i]`` tokens, left-aligned
    in row i of a padded (B, L) layout) goes to slots ``offset[i]``.. of row ``row[i]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    B = len(lengths)
    pair = np.repeat(np.arange(B), lengths)  # (n,) the pair of each real token
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(len(pair)) - starts[pair]  # its position in the sentence
    index = pair * L + pos  # its padded flat position
    real = row[pair] * width + offset[pair] + pos  # its slot
    segment = np.zeros(rows * width, dtype=np.int64)
    segment[real] = pair + 1
    position = np.zeros(rows * width, dtype=np.int64)
    position[real] = pos

    def t(a, shape=None):
        a = torch.from_numpy(a if shape is None else a.reshape(shape))
        return a.to(device) if device is not None else a

    return PackedSide(t(real), t(index), t(segment, (rows, width)), t(position, (rows, width)))


def pack_lengths(src_len, tgt_len, width: int, S: int, T: int, device=None,
                 open_rows: int = OPEN_ROWS):  # fmt: skip
    """Both sides of the packing of a padded batch whose sources are ``src_len`` tokens of
    S and targets ``tgt_len`` of T: (source side, target side)."""
    lay = row_layout(src_len, tgt_len, width, open_rows)
    src = packed_side(src_len, lay.row, lay.src_offset, lay.rows, lay.src_width, S, device)
    tgt = packed_side(tgt_len, lay.row, lay.tgt_offset, lay.rows, lay.tgt_width, T, device)
    return src, tgt


def segment_bias(
    seg_q: torch.Tensor, seg_k: torch.Tensor, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """(R, Wq) and (R, Wk) segment ids -> (R, 1, Wq, Wk) additive mask (0 = may attend,
    -inf = may not): a query sees the keys of its own segment, and with ``causal`` only
    those at or before its slot (a target row's segments sit at the same slots on both
    sides of its self-attention). A query in an empty slot sees every key, so that no row
    of the softmax is empty (a fully masked row is NaN in the fused kernels); its output is
    never read, so no gradient flows from it."""
    same = seg_q[:, :, None] == seg_k[:, None, :]  # (R, Wq, Wk)
    if causal:
        Wq, Wk = seg_q.shape[1], seg_k.shape[1]
        same = same & (torch.arange(Wk, device=seg_k.device) <= torch.arange(
            Wq, device=seg_q.device)[:, None])  # fmt: skip
    allowed = same | (seg_q == 0)[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))[:, None]


@dataclass(frozen=True)
class RowSegments:
    """Which sentence each slot of packed rows holds (0 = none) and the token's position in
    it, for the sources (R, Ws) and the targets (R, Wt): what ``Transformer.forward`` needs
    besides the ids."""

    src_segment: torch.Tensor
    src_position: torch.Tensor
    tgt_segment: torch.Tensor
    tgt_position: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> RowSegments:
        return RowSegments(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.src_segment, self.src_position, self.tgt_segment, self.tgt_position


@dataclass(frozen=True)
class PackedBatch:
    """A batch of sentence pairs in packed rows: ids as in ``seq2seq.Batch`` (pad in the
    empty slots), R rows, and their ``rows`` segments."""

    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    rows: RowSegments

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        ids = (t.to(device, non_blocking=non_blocking) for t in self.ids())
        return PackedBatch(*ids, self.rows.to(device, non_blocking))

    def pin_memory(self) -> PackedBatch:
        rows = RowSegments(*(t.pin_memory() for t in self.rows.tensors()))
        return PackedBatch(*(t.pin_memory() for t in self.ids()), rows)

    def ids(self) -> tuple[torch.Tensor, ...]:
        return self.src, self.src_mask, self.tgt_in, self.tgt_out


def pack_batch(batch, pad_id: int, width: int, open_rows: int = OPEN_ROWS) -> PackedBatch:
    """A padded ``seq2seq.Batch`` (on the host) in packed rows of ``width`` slots a side."""
    src_len = batch.src_mask.sum(1)
    tgt_len = (batch.tgt_out != pad_id).sum(1)
    S, T = batch.src.shape[1], batch.tgt_in.shape[1]
    src, tgt = pack_lengths(src_len.numpy(), tgt_len.numpy(), width, S, T, open_rows=open_rows)
    rows = RowSegments(src.segment, src.position, tgt.segment, tgt.position)
    return PackedBatch(
        src.pack(batch.src, fill=pad_id),
        src.segment > 0,
        tgt.pack(batch.tgt_in, fill=pad_id),
        tgt.pack(batch.tgt_out, fill=pad_id),
        rows,
    )
