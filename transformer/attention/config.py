"""``model.attention``: the kind of each attention role and the pattern sizes, checked
(each error names its key), and the kind built from a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from .kinds import Additive, AttentionKind, Dot, ScaledDot
from .linear import Linear
from .patterns import Local, Sparse

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
