"""The contract every sequence-to-sequence model implements (Transformer and RNN).

Search code, the trainer and translate.py only ever call what is defined here:

- ``forward(src, src_mask, tgt_in) -> logits (B, T, V)``  teacher forcing
- ``encode(src, src_mask) -> EncoderOut``
- ``init_state(enc) -> DecoderState``
- ``decode_step(prev_tokens (B,), enc, state) -> (logits (B, V), state)``

``EncoderOut.reorder`` and ``DecoderState.reorder`` select along the batch dimension so
that beam search can expand and reorder hypotheses without ever looking inside a model.
Masks follow one convention everywhere: bool, True = a real token that may be attended.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .values import is_count, is_flag, is_number


def _reorder(value, idx: torch.Tensor):
    """index_select dim 0 of a tensor, recursing into lists/tuples/dicts; other values pass."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx)
    if isinstance(value, (list, tuple)):
        return type(value)(_reorder(v, idx) for v in value)
    if isinstance(value, dict):
        return {k: _reorder(v, idx) for k, v in value.items()}
    return value


class OnHost:
    """A tensor argument of ``forward`` that must stay on the host (the RNN's source
    lengths). DistributedDataParallel with ``device_ids`` (on CUDA) copies every tensor
    among a forward's arguments to the device, inside tuples, lists and dicts too, but
    passes any other object as it is; a model then reads ``.tensor`` where it was."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class Reorderable:
    """Mixin for dataclasses whose tensor fields all have the batch as dimension 0."""

    def reorder(self, idx: torch.Tensor):
        """Return a copy with every tensor field index-selected by ``idx`` (shape (B',))."""
        changes = {f.name: _reorder(getattr(self, f.name), idx) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)


@dataclass
class Batch:
    """A padded batch of sentence pairs.

    src (B, S) ids, src_mask (B, S) bool True = real token,
    tgt_in (B, T) = BOS + y, tgt_out (B, T) = y + EOS (pad where tgt_in is pad).
    """

    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in dataclasses.astuple(self)))

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in dataclasses.astuple(self)))

    def halves(self) -> list[Batch]:
        """The batch split into two along B (one piece when B == 1); used to retry a batch
        that ran out of memory."""
        cut = (self.src.shape[0] + 1) // 2
        parts = [dataclasses.astuple(self)]
        if self.src.shape[0] > 1:
            parts = [tuple(t[:cut] for t in parts[0]), tuple(t[cut:] for t in parts[0])]
        return [Batch(*p) for p in parts]


@dataclass
class EncoderOut(Reorderable):
    """memory (B, S, D) encoder states; src_mask (B, S) bool True = real token.

    ``extra`` holds model-specific per-sentence tensors (e.g. the RNN's pre-projected keys).
    """

    memory: torch.Tensor
    src_mask: torch.Tensor
    extra: dict = dataclasses.field(default_factory=dict)


@dataclass
class DecoderState(Reorderable):
    """Incremental decoding state. ``tensors`` is model-defined; ``step`` = tokens consumed."""

    tensors: dict
    step: int = 0


def check_model_settings(
    sizes: dict,
    dropouts: dict,
    flags: dict,
    share_embeddings: bool,
    vocab_sizes: tuple[int, int],
    may_be_zero: tuple[str, ...] = (),
) -> None:
    """The checks both models make of their settings, each failure a ValueError naming its
    ``model.`` key: ``sizes`` are integers >= 1 (>= 0 for the names in ``may_be_zero``),
    ``dropouts`` numbers in [0, 1), ``flags`` true or false (a string would count as true),
    and one embedding for both sides needs equal vocabulary sizes."""
    for name, value in sizes.items():
        least = 0 if name in may_be_zero else 1
        if not is_count(value, least):
            raise ValueError(f"model.{name} must be an integer >= {least}, got {value!r}")
    for name, p in dropouts.items():
        if not (is_number(p) and 0.0 <= p < 1.0):
            raise ValueError(f"model.{name} must be a number in [0, 1), got {p!r}")
    for name, value in flags.items():
        if not is_flag(value):
            raise ValueError(f"model.{name} must be true or false, got {value!r}")
    src_vocab_size, tgt_vocab_size = vocab_sizes
    if share_embeddings and src_vocab_size != tgt_vocab_size:
        raise ValueError(
            "model.share_src_tgt_embeddings=true needs a joint vocabulary "
            f"(source {src_vocab_size} vs target {tgt_vocab_size} entries); "
            "set data.joint_vocab=true or model.share_src_tgt_embeddings=false"
        )


class Seq2Seq(nn.Module):
    """Base class: a model maps (src, src_mask, tgt_in) to next-token logits.

    ``max_target_len``: the most target positions the decoder can take (a model with
    learned or tabled positions has a limit), which also bounds an output's length, EOS
    included; None: no limit. The searches cap their length limits with it."""

    max_target_len: int | None = None

    def forward(self, src, src_mask, tgt_in):  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> EncoderOut:  # pragma: no cover
        raise NotImplementedError

    def init_state(self, enc: EncoderOut) -> DecoderState:  # pragma: no cover
        raise NotImplementedError

    def decode_step(self, prev_tokens, enc, state):  # pragma: no cover
        raise NotImplementedError

    def decode_prefix(self, tgt_in: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher-forced decoder over ``enc``: tgt_in (B, T) -> logits (B, T, V); ``forward``
        is ``decode_prefix(tgt_in, encode(src, src_mask))``. Uncached search re-runs it."""
        raise NotImplementedError  # pragma: no cover - interface

    def num_parameters(self) -> int:
        """Parameters counted once even when tied."""
        return sum(p.numel() for p in self.parameters())
