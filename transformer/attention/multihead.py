"""Multi-head attention (Vaswani et al. 2017, Section 3.2.2): the learned projections, the
heads and the incremental-decoding cache around an ``AttentionKind``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttentionConfig, make_kind


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
