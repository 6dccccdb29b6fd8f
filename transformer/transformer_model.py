"""The encoder-decoder Transformer (Vaswani et al. 2017), implementing the Seq2Seq contract.

Embeddings scaled by sqrt(d_model) plus sinusoidal positions; N encoder layers; N decoder
layers with masked self-attention and cross-attention; pre-norm (default, with a final
LayerNorm on each stack) or post-norm; the target embedding is tied to the output
projection, and all three matrices are shared when the vocabulary is joint (Section 3.4).

Incremental decoding (``decode_step``) keeps per-layer self-attention keys/values (or, for
linear attention, its recurrent state); the cross-attention keys/values depend on the
source only, so ``encode`` computes them once into ``EncoderOut.extra["cross_kv"]``, where
beam search expands them once instead of reordering them at every step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .attention import (
    SDPA_KINDS,
    MultiHeadAttention,
    attention_config,
    attention_dtype,
    key_bias,
    padding_mask,
)
from .dropout import Dropout
from .layers import DecoderLayer, EncoderLayer, ScaledEmbedding, SinusoidalPositions
from .packing import RowSegments, segment_bias
from .seq2seq import DecoderState, EncoderOut, Seq2Seq, check_model_settings


class Unbatched:
    """A value in ``EncoderOut.extra`` without a batch dimension, which ``reorder`` (beam
    search) passes as it is: it selects along dim 0 of tensors, lists, tuples and dicts."""

    def __init__(self, value):
        self.value = value


class Transformer(Seq2Seq):
    """Encoder-decoder Transformer.

    :param src_vocab_size, tgt_vocab_size: vocabulary sizes (equal for a joint vocabulary)
    :param pad_id: padding id (its embedding rows start at zero; padded positions are masked
        out, but with tied embeddings the output projection still gives the pad row a
        gradient)
    :param norm: "pre" or "post"
    :param tie_embeddings: tie target embedding and output projection
    :param share_src_tgt_embeddings: one embedding for source and target (a joint
        vocabulary, ``data.joint_vocab=true``; the trainer refuses it otherwise)
    :param attention: ``model.attention``, plain values: the attention kind of the encoder,
        decoder and cross-attention and the pattern sizes (``attention.AttentionConfig``);
        None = scaled dot-product everywhere
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        pad_id: int,
        d_model: int = 256,
        n_heads: int = 4,
        d_ff: int = 1024,
        n_enc_layers: int = 3,
        n_dec_layers: int = 3,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        act_dropout: float = 0.0,
        norm: str = "pre",
        tie_embeddings: bool = True,
        share_src_tgt_embeddings: bool = True,
        max_positions: int = 1024,
        attention: Mapping | None = None,
    ):
        super().__init__()
        sizes = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                     d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_dec_layers=n_dec_layers,
                     max_positions=max_positions, n_enc_layers=n_enc_layers)  # fmt: skip
        check_model_settings(
            sizes,
            dict(dropout=dropout, attn_dropout=attn_dropout, act_dropout=act_dropout),
            dict(tie_embeddings=tie_embeddings, share_src_tgt_embeddings=share_src_tgt_embeddings),
            share_src_tgt_embeddings,
            (src_vocab_size, tgt_vocab_size),
            may_be_zero=("n_enc_layers",),  # no encoder layer: attend to the embeddings
        )
        if norm not in ("pre", "post"):
            raise ValueError(f"model.norm must be 'pre' or 'post', got {norm!r}")
        self.pad_id = pad_id
        self.d_model = d_model
        self.n_heads = n_heads
        pre = norm == "pre"
        att = attention_config(attention)
        self.attention_options = att  # the trainer refuses settings no role reads
        # The roles given a key mask that take it as an additive mask made once per pass
        self.bias_roles = {
            role for role in ("encoder", "cross") if getattr(att, role) in SDPA_KINDS
        }
        self.takes_rows = all(k in SDPA_KINDS for k in (att.encoder, att.decoder, att.cross))
        layer_args = (d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre, att)

        self.tgt_embed = ScaledEmbedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.src_embed = (
            self.tgt_embed
            if share_src_tgt_embeddings
            else ScaledEmbedding(src_vocab_size, d_model, padding_idx=pad_id)
        )
        self.positions = SinusoidalPositions(d_model, max_positions)
        self.max_target_len = max_positions  # output step t takes position t
        self.embed_dropout = Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(n_enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(n_dec_layers))
        # Pre-norm leaves the residual stream unnormalised: a final LayerNorm closes each stack.
        self.enc_norm = nn.LayerNorm(d_model) if pre else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if pre else nn.Identity()
        self.out_proj = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self.reset_parameters()
        if tie_embeddings:
            self.out_proj.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for m in self.modules():  # stacked W_q, W_k, W_v: Xavier fans of each D x D block
            if isinstance(m, MultiHeadAttention):
                m.xavier_init()
        # Embeddings are multiplied by sqrt(d): start them at std d^-1/2 so inputs are O(1).
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, std=self.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()

    def key_mask(self, src_mask: torch.Tensor, role: str, like: torch.Tensor) -> torch.Tensor:
        """The (B, 1, 1, S) key mask of the source for the attention ``role`` (encoder or
        cross), once for all its layers: additive, of the dtype attention runs in for
        activations ``like``, where that role runs SDPA (``key_bias``), else bool."""
        mask = padding_mask(src_mask)
        return key_bias(mask, attention_dtype(like)) if role in self.bias_roles else mask

    def check_rows(self, rows: RowSegments | None) -> None:
        if rows is not None and not self.takes_rows:
            raise ValueError(
                "packed rows need scaled-dot-product attention (model.attention kinds "
                f"{list(SDPA_KINDS)}) in the encoder, the decoder and the cross-attention"
            )

    # -- encoder ---------------------------------------------------------------------------
    def encode(
        self, src: torch.Tensor, src_mask: torch.Tensor, embedded=None, rows=None
    ) -> EncoderOut:
        """src (B, S), src_mask (B, S) bool -> EncoderOut(memory (B, S, D), src_mask), with
        extra["cross_kv"] = [k_1, v_1, k_2, ...] per decoder layer, each (B, h, S, d_head),
        and extra["cross_q"] the query rows split from the rows that made them, per decoder
        layer (``MultiHeadAttention.split_params``; in an ``Unbatched``). ``embedded``: the
        source's scaled embeddings (B, S, D) when already looked up (``forward``). ``rows``:
        the sources are packed rows (``forward``)."""
        self.check_rows(rows)
        if embedded is None:
            embedded = self.src_embed(src)
        index = None if rows is None else rows.src_position
        x = self.embed_dropout(self.positions(embedded, index=index))  # (B, S, D)
        if rows is None:
            mask = self.key_mask(src_mask, "encoder", x)  # (B, 1, 1, S)
        else:  # (B, 1, S, S): each token sees its own sentence
            mask = segment_bias(rows.src_segment, rows.src_segment, False, attention_dtype(x))
        for layer in self.encoder:
            x = layer(x, mask)
        memory = self.enc_norm(x)
        splits = [layer.cross_attn.split_params() for layer in self.decoder]
        cross = self.cross_keys_values(memory, [kv_params for _, kv_params in splits])
        cross_q = Unbatched([q_params for q_params, _ in splits])
        return EncoderOut(memory, src_mask, extra={"cross_kv": cross, "cross_q": cross_q})

    def cross_keys_values(self, memory: torch.Tensor, kv_params: list) -> list[torch.Tensor]:
        """[k_1, v_1, k_2, ...], each (B, h, S, d_head): every decoder layer's cross-attention
        keys and values of ``memory`` (B, S, D), from their (W_kv, b_kv) stacked into one
        matrix product. The backward pass then takes one product for the memory's gradient,
        one for the weights' and one bias sum, where a product per layer took three each and
        additions to sum the memory's gradients."""
        if not kv_params:
            return []
        weight = torch.cat([w for w, _ in kv_params])  # (layers * 2D, D)
        bias = torch.cat([b for _, b in kv_params])
        return list(self.decoder[0].cross_attn.project(memory, (weight, bias), 2 * len(kv_params)))

    @staticmethod
    def cross_q(enc: EncoderOut, i: int):
        """Decoder layer i's cross-attention (W_q, b_q) from ``encode``, or None (then split
        again: an EncoderOut made elsewhere)."""
        held = enc.extra.get("cross_q")
        return held.value[i] if held is not None else None

    # -- decoder ---------------------------------------------------------------------------
    def forward(
        self, src, src_mask, tgt_in, project: bool = True, rows: RowSegments | None = None
    ) -> torch.Tensor:
        """Teacher forcing: src (B, S), src_mask (B, S), tgt_in (B, T) -> logits (B, T, V),
        or with ``project=False`` the features (B, T, D) that ``out_proj`` maps to them.

        ``rows``: the batch is in packed rows (transformer/packing.py), several sentence pairs
        to a row of ``src`` and ``tgt_in`` (B is then the rows, S and T their widths), with
        each token's sentence and position in it; attention keeps the sentences apart.

        With one embedding for both languages, the source and the target are looked up
        together, so the backward pass scatters their gradients into it once, not twice and
        then adds (on a GPU, torch scatters more than 3,072 ids by sorting them, then scans:
        several kernels per scatter).
        """
        src_emb = tgt_emb = None
        if self.src_embed is self.tgt_embed:
            src_emb, tgt_emb = self.tgt_embed.lookup(src, tgt_in)
        enc = self.encode(src, src_mask, embedded=src_emb, rows=rows)
        return self.decode_prefix(tgt_in, enc, project, embedded=tgt_emb, rows=rows)

    def decode_prefix(
        self, tgt_in: torch.Tensor, enc: EncoderOut, project: bool = True, embedded=None,
        rows: RowSegments | None = None,
    ):  # fmt: skip
        """Teacher-forced decoder stack over ``enc``: tgt_in (B, T) -> logits (B, T, V)
        (features (B, T, D) with ``project=False``); ``embedded``: tgt_in's scaled
        embeddings when already looked up; ``rows``: packed rows (``forward``).

        Training uses it through ``forward``; uncached decoding re-runs it on the prefix.
        """
        self.check_rows(rows)
        if embedded is None:
            embedded = self.tgt_embed(tgt_in)
        index = None if rows is None else rows.tgt_position
        y = self.embed_dropout(self.positions(embedded, index=index))  # (B, T, D)
        self_mask = None
        if rows is None:
            mem_mask = self.key_mask(enc.src_mask, "cross", y)
        else:  # each target token sees its own sentence: its prefix, and its source
            dtype = attention_dtype(y)
            self_mask = segment_bias(rows.tgt_segment, rows.tgt_segment, True, dtype)
            mem_mask = segment_bias(rows.tgt_segment, rows.src_segment, False, dtype)
        cross = enc.extra["cross_kv"]
        for i, layer in enumerate(self.decoder):
            kv = (cross[2 * i], cross[2 * i + 1])
            y, _, _ = layer(
                y, enc.memory, mem_mask, cross_kv=kv, cross_q=self.cross_q(enc, i),
                self_mask=self_mask,
            )  # fmt: skip
        y = self.dec_norm(y)
        return self.out_proj(y) if project else y

    def init_state(self, enc: EncoderOut) -> DecoderState:
        """Empty self-attention caches (the cross-attention K/V are in ``enc.extra``)."""
        B, like = enc.memory.shape[0], enc.extra["cross_kv"][0]  # (B, h, S, d_head)
        selfs = []
        for layer in self.decoder:
            selfs += list(layer.self_attn.empty_cache(B, like=like))  # (k, v) or linear state
        return DecoderState(tensors={"self_kv": selfs}, step=0)

    def decode_step(self, prev_tokens, enc: EncoderOut, state: DecoderState):
        """prev_tokens (B,) -> logits (B, V) for the next position, and the updated state."""
        y = self.tgt_embed(prev_tokens[:, None])  # (B, 1, D)
        y = self.embed_dropout(self.positions(y, start=state.step))
        mem_mask = self.key_mask(enc.src_mask, "cross", y)
        selfs, cross = state.tensors["self_kv"], enc.extra["cross_kv"]
        new_selfs = []
        for i, layer in enumerate(self.decoder):
            y, (k, v), _ = layer(
                y,
                enc.memory,
                mem_mask,
                self_kv=(selfs[2 * i], selfs[2 * i + 1]),
                cross_kv=(cross[2 * i], cross[2 * i + 1]),
                cross_q=self.cross_q(enc, i),
            )
            new_selfs += [k, v]
        logits = self.out_proj(self.dec_norm(y))[:, 0]  # (B, V)
        return logits, DecoderState(tensors={"self_kv": new_selfs}, step=state.step + 1)

    def cross_attention_modules(self) -> list:
        """The decoder's cross-attention modules, in layer order (for plots)."""
        return self.attention_modules("cross")

    def attention_modules(self, role: str) -> list:
        """The attention modules of one role, in layer order (for plots): ``encoder`` (the
        encoder's self-attention), ``decoder`` (the decoder's causal self-attention) or
        ``cross``."""
        if role == "encoder":
            return [layer.self_attn for layer in self.encoder]
        if role == "decoder":
            return [layer.self_attn for layer in self.decoder]
        if role == "cross":
            return [layer.cross_attn for layer in self.decoder]
        raise ValueError(f"unknown attention role {role!r}: encoder, decoder or cross")
