"""RNNsearch (Bahdanau, Cho & Bengio 2014, "Neural Machine Translation by Jointly Learning
to Align and Translate"), implementing the Seq2Seq contract.

- Encoder: a bidirectional GRU over source embeddings (Section 3.2); padded batches are
  packed so the cuDNN kernel runs on a GPU and padding never enters a state. Packing needs
  the source lengths on the host: the trainer passes them, counted on the host before the
  batch is copied to the device (``src_lengths``, in an ``OnHost`` that DDP does not copy
  to the device), so that a training step does not wait for the device to copy them back.
- Bridge: s_0 = tanh(W_s h_1<-), the backward state at the first source token (Appendix A.2.2).
- Decoder: a stack of GRU cells; the previous top state s_{i-1} attends over the encoder
  states h_j (Section 3.1); the context c_i and E y_{i-1} are the cell input.
- Attention scores (``RNNAttention``): ``additive`` e_ij = v^T tanh(W s_{i-1} + U h_j)
  (Bahdanau, Appendix A.1.2), ``dot`` e_ij = s_{i-1}^T P h_j and ``general``
  e_ij = s_{i-1}^T W_a h_j (Luong et al. 2015, Section 3.1). ``dot`` needs the projection P
  of the 2H-wide bidirectional states to the decoder size H, so it differs from ``general``
  only by P's bias b, and that bias adds s_{i-1}^T b to every score of a target step, which
  the softmax cancels: ``dot`` and ``general`` compute the same functions (b gets no
  gradient) and differ only in their random initialisation. U h_j, P h_j or W_a h_j is
  computed once per sentence in ``encode``.
  All three cost O(S A) per target step (A = attention size), O(T S A) per sentence.
- Deep output (Appendix A.2.2): t_i = maxout_2(L_o [s_i; c_i; E y_{i-1}]) of width emb_dim,
  then the output projection, tied to the target embedding when ``tie_embeddings``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .dropout import Dropout
from .seq2seq import DecoderState, EncoderOut, OnHost, Seq2Seq, check_model_settings

ATTENTIONS = ("additive", "dot", "general")


class RNNAttention(nn.Module):
    """Masked single-query attention over encoder states, with keys projected once.

    :param kind: one of ``ATTENTIONS``
    :param query_size: decoder hidden size H (also the attention size A)
    :param memory_size: encoder state size (2H for a bidirectional encoder)
    """

    def __init__(self, kind: str, query_size: int, memory_size: int):
        super().__init__()
        self.kind = kind
        # additive: U h_j + b; dot: P h_j + b (size matching); general: W_a h_j
        self.key_proj = nn.Linear(memory_size, query_size, bias=kind != "general")
        if kind == "additive":
            self.query_proj = nn.Linear(query_size, query_size, bias=False)  # W
            self.score_proj = nn.Linear(query_size, 1, bias=False)  # v

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, S, memory_size) encoder states -> (B, S, A) keys, once per sentence."""
        return self.key_proj(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        :param query: (B, H) previous decoder state s_{i-1}
        :param keys: (B, S, A) from ``project_keys``
        :param mask: (B, S) bool, True = real source token
        :return: (B, S) weights summing to 1 over real tokens, exactly 0 on padding
        """
        if self.kind == "additive":
            hidden = torch.tanh(self.query_proj(query).unsqueeze(1) + keys)  # (B, S, A)
            scores = self.score_proj(hidden).squeeze(-1)  # (B, S)
        else:
            scores = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)  # (B,S,A)@(B,A,1) -> (B,S)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class BahdanauRNN(Seq2Seq):
    """Bi-GRU encoder, attentive GRU decoder and maxout deep output (RNNsearch).

    :param src_vocab_size, tgt_vocab_size: vocabulary sizes
    :param pad_id: padding id, valid in both vocabularies (its embedding starts at zero)
    :param emb_dim: embedding size E (also the deep-output size, so tying always fits)
    :param hidden_size: GRU size H per direction; the decoder and attention size too
    :param enc_layers, dec_layers: stacked GRU layers
    :param dropout: on embeddings, encoder states, between decoder layers, before the output
    :param attention: one of ``ATTENTIONS``
    :param tie_embeddings: the output projection reuses the target embedding matrix
    :param share_src_tgt_embeddings: one embedding for both sides (needs equal vocab sizes)
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        pad_id: int,
        emb_dim: int = 256,
        hidden_size: int = 512,
        enc_layers: int = 1,
        dec_layers: int = 1,
        dropout: float = 0.3,
        attention: str = "additive",
        tie_embeddings: bool = True,
        share_src_tgt_embeddings: bool = False,
    ):
        super().__init__()
        sizes = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                     emb_dim=emb_dim, hidden_size=hidden_size, enc_layers=enc_layers,
                     dec_layers=dec_layers)  # fmt: skip
        check_model_settings(
            sizes,
            dict(dropout=dropout),
            dict(tie_embeddings=tie_embeddings, share_src_tgt_embeddings=share_src_tgt_embeddings),
            share_src_tgt_embeddings,
            (src_vocab_size, tgt_vocab_size),
        )
        if not 0 <= pad_id < min(src_vocab_size, tgt_vocab_size):
            raise ValueError(
                f"pad_id={pad_id} is outside the vocabularies "
                f"(source {src_vocab_size}, target {tgt_vocab_size} entries)"
            )
        if attention not in ATTENTIONS:
            raise ValueError(f"model.attention must be one of {ATTENTIONS}, got {attention!r}")
        self.pad_id = pad_id
        self.takes_src_lengths = True  # encode/forward take host-side lengths (the trainer's)
        self.emb_dim = emb_dim
        self.hidden_size = hidden_size
        self.dec_layers = dec_layers
        H = hidden_size

        self.tgt_embed = self._embedding(tgt_vocab_size, emb_dim, pad_id)
        self.src_embed = (
            self.tgt_embed
            if share_src_tgt_embeddings
            else self._embedding(src_vocab_size, emb_dim, pad_id)
        )
        self.dropout = Dropout(dropout)
        self.encoder = nn.GRU(
            emb_dim,
            H,
            num_layers=enc_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if enc_layers > 1 else 0.0,
        )
        self.bridge = nn.Linear(H, dec_layers * H)  # W_s
        self.attention = RNNAttention(attention, H, 2 * H)
        self.decoder = nn.ModuleList(
            nn.GRUCell(emb_dim + 2 * H if layer == 0 else H, H) for layer in range(dec_layers)
        )
        self.readout = nn.Linear(H + 2 * H + emb_dim, 2 * emb_dim)  # L_o, pooled by maxout_2
        self.out_proj = nn.Linear(emb_dim, tgt_vocab_size)
        if tie_embeddings:
            self.out_proj.weight = self.tgt_embed.weight

    @staticmethod
    def _embedding(vocab_size: int, emb_dim: int, pad_id: int) -> nn.Embedding:
        """N(0, 1/E) init keeps tied logits O(1); the pad row starts at zero."""
        emb = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        nn.init.normal_(emb.weight, mean=0.0, std=emb_dim**-0.5)
        with torch.no_grad():
            emb.weight[pad_id].zero_()
        return emb

    def encode(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor,
        src_lengths: torch.Tensor | OnHost | None = None,
    ) -> EncoderOut:
        """
        :param src: (B, S) source ids  :param src_mask: (B, S) bool, True = real token
            (real tokens first, then padding; every row needs at least one real token)
        :param src_lengths: (B,) int64 ``src_mask.sum(1)``, on the CPU, as it is or in an
            ``OnHost`` (the trainer's, which DDP leaves on the host); counted from the mask
            when not given, which on a GPU waits for the device to copy them back
        :return: memory (B, S, 2H) annotations h_j (zero on padding); extra["keys"] (B, S, H)
            the projected keys, extra["summary"] (B, H) the backward state at token 1
        """
        B, S = src.shape
        # pack_padded_sequence wants the lengths on the CPU
        if isinstance(src_lengths, OnHost):
            src_lengths = src_lengths.tensor
        lengths = (src_mask.sum(dim=1) if src_lengths is None else src_lengths).cpu()
        if lengths.shape != (B,):
            raise ValueError(f"src_lengths has shape {tuple(lengths.shape)}, not ({B},)")
        if int(lengths.min()) < 1:
            raise ValueError("every source sentence needs at least one real token")
        emb = self.dropout(self.src_embed(src))  # (B, S, E)
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)  # h_n (2 * enc_layers, B, H), back in input order
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, 2H)
        memory = self.dropout(memory)
        keys = self.attention.project_keys(memory)  # (B, S, H)
        # The top layer's backward GRU ends on the first token: Bahdanau's h_1<-.
        summary = h_n[-1]  # (B, H)
        return EncoderOut(memory, src_mask, extra={"keys": keys, "summary": summary})

    def init_state(self, enc: EncoderOut) -> DecoderState:
        """s_0 = tanh(W_s h_1<-) for every decoder layer: tensors["hidden"] (B, L, H)."""
        B = enc.memory.shape[0]
        hidden = torch.tanh(self.bridge(enc.extra["summary"]))  # (B, L * H)
        hidden = hidden.view(B, self.dec_layers, self.hidden_size)  # (B, L, H)
        return DecoderState({"hidden": hidden})

    def _recur(self, emb: torch.Tensor, enc: EncoderOut, hidden: torch.Tensor):
        """One recurrent step, without the readout; shared by ``forward`` and ``decode_step``.

        :param emb: (B, E) embedded y_{i-1} (after dropout)
        :param hidden: (B, L, H) s_{i-1} of every layer
        :return: s_i of the top layer (B, H), context c_i (B, 2H), weights (B, S),
            new hidden (B, L, H)
        """
        attn = self.attention(hidden[:, -1], enc.extra["keys"], enc.src_mask)  # (B, S)
        context = torch.bmm(attn.unsqueeze(1), enc.memory).squeeze(1)  # (B,1,S)@(B,S,2H) -> (B,2H)
        x = torch.cat([emb, context], dim=-1)  # (B, E + 2H)
        new_hidden = []
        for layer, cell in enumerate(self.decoder):
            h = cell(x, hidden[:, layer])  # (B, H)
            new_hidden.append(h)
            x = self.dropout(h) if layer < self.dec_layers - 1 else h
        return new_hidden[-1], context, attn, torch.stack(new_hidden, dim=1)  # hidden (B, L, H)

    def _readout(self, s, context, emb, project: bool = True) -> torch.Tensor:
        """Deep output over any leading dims: s (..., H), c (..., 2H), emb (..., E) -> logits
        (..., V), or with ``project=False`` the features (..., E) that ``out_proj`` maps."""
        t = self.readout(torch.cat([s, context, emb], dim=-1))  # (..., 2E)
        t = self.dropout(t.unflatten(-1, (self.emb_dim, 2)).amax(dim=-1))  # (..., E) maxout
        return self.out_proj(t) if project else t

    def _unroll(self, tgt_in: torch.Tensor, enc: EncoderOut):
        """Teacher-forced recurrence: emb (B,T,E), s (B,T,H), c (B,T,2H), weights (B,T,S)."""
        hidden = self.init_state(enc).tensors["hidden"]  # (B, L, H)
        emb = self.dropout(self.tgt_embed(tgt_in))  # (B, T, E)
        states, contexts, attns = [], [], []
        for t in range(tgt_in.shape[1]):
            s, context, attn, hidden = self._recur(emb[:, t], enc, hidden)
            states.append(s)
            contexts.append(context)
            attns.append(attn)
        return emb, torch.stack(states, 1), torch.stack(contexts, 1), torch.stack(attns, 1)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor,
        tgt_in: torch.Tensor,
        project=True,
        src_lengths: torch.Tensor | OnHost | None = None,
    ) -> torch.Tensor:
        """
        :param src: (B, S) ids  :param src_mask: (B, S) bool True = real
        :param tgt_in: (B, T) BOS + y
        :param project: False returns the features (B, T, E) that ``out_proj`` maps to logits
        :param src_lengths: (B,) real source tokens, on the CPU (see ``encode``)
        :return: logits (B, T, V)
        """
        return self.decode_prefix(tgt_in, self.encode(src, src_mask, src_lengths), project)

    def decode_prefix(self, tgt_in: torch.Tensor, enc: EncoderOut, project: bool = True):
        """Teacher-forced decoder over ``enc``: tgt_in (B, T) -> logits (B, T, V) (features
        (B, T, E) with ``project=False``).

        Training uses it through ``forward``; uncached decoding re-runs it on the prefix.
        """
        emb, states, contexts, _ = self._unroll(tgt_in, enc)
        return self._readout(states, contexts, emb, project)  # one (B*T, E) x (E, V) product

    @torch.no_grad()
    def attention_weights(
        self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced alignment matrix (B, T, S) for plotting; rows sum to 1 (call in eval)."""
        return self._unroll(tgt_in, self.encode(src, src_mask))[3]

    def decode_step(
        self, prev_tokens: torch.Tensor, enc: EncoderOut, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState]:
        """
        :param prev_tokens: (B,) y_{i-1}
        :param state: tensors["hidden"] (B, L, H)
        :return: logits (B, V) and the new state, whose tensors["attn"] (B, S) holds this
            step's attention weights
        """
        emb = self.dropout(self.tgt_embed(prev_tokens))  # (B, E)
        s, context, attn, hidden = self._recur(emb, enc, state.tensors["hidden"])
        logits = self._readout(s, context, emb)  # (B, V)
        return logits, DecoderState({"hidden": hidden, "attn": attn}, step=state.step + 1)
