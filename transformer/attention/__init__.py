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

Masks are built in one place, ``masks``. Convention: a bool mask, True = the query may
attend to that key; shapes broadcast to (B, h, T_q, T_k). Queries are aligned to the end of
the keys: with T_q < T_k (a decoder step after a cache), query i sits at position
T_k - T_q + i, and ``causal`` lets it see keys 0..that position. The kinds that run SDPA
(``SDPA_KINDS``) also take a key mask in its additive form, made once per forward pass
(``key_bias``).

Modules: ``masks`` (every mask), ``kinds`` (the interface and the dense kinds), ``patterns``
(local, sparse), ``linear``, ``config`` (``model.attention``), ``multihead``
(``MultiHeadAttention``), ``sdpa`` (the CUDA kernels SDPA may use).
"""

from .config import (
    CROSS_KINDS,
    KINDS,
    SDPA_KINDS,
    SPARSE_PATTERNS,
    AttentionConfig,
    attention_config,
    ignored_options,
    make_kind,
)
from .kinds import Additive, AttentionKind, Dot, ScaledDot
from .linear import Linear, elu_feature
from .masks import (
    as_bool,
    attention_dtype,
    causal_mask,
    key_bias,
    local_mask,
    masked_softmax,
    padding_mask,
    sparse_mask,
)
from .multihead import MultiHeadAttention, stacked_from
from .patterns import Local, Sparse
from .sdpa import AUTO_CUDA_SDPA, SDPA_BACKENDS, use_sdpa_backends

__all__ = [
    "AUTO_CUDA_SDPA",
    "CROSS_KINDS",
    "KINDS",
    "SDPA_BACKENDS",
    "SDPA_KINDS",
    "SPARSE_PATTERNS",
    "Additive",
    "AttentionConfig",
    "AttentionKind",
    "Dot",
    "Linear",
    "Local",
    "MultiHeadAttention",
    "ScaledDot",
    "Sparse",
    "as_bool",
    "attention_config",
    "attention_dtype",
    "causal_mask",
    "elu_feature",
    "ignored_options",
    "key_bias",
    "local_mask",
    "make_kind",
    "masked_softmax",
    "padding_mask",
    "sparse_mask",
    "stacked_from",
    "use_sdpa_backends",
]
