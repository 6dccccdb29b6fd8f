"""Packed rows (transformer/packing.py): the layout keeps every pair whole and in order, and
attention over packed rows with the segment mask equals attention over the padded batch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformer.attention import key_bias, padding_mask
from transformer.loss import sequence_loss
from transformer.packing import (
    AUTO_CUDA_WIDTH,
    MIN_PAIRS_PER_ROW,
    OPEN_ROWS,
    mean_pair_len,
    pack_batch,
    pack_lengths,
    resolve_width,
    row_layout,
    segment_bias,
)
from transformer.seq2seq import Batch
from transformer.transformer_model import Transformer
from transformer.translator import trial_build


def test_layout_fills_rows_and_never_overflows():
    src = [5, 7, 3, 9, 2, 16]
    tgt = [6, 4, 5, 9, 3, 1]
    lay = row_layout(src, tgt, 16)
    assert (lay.src_width, lay.tgt_width) == (16, 16)
    # 5+7+3 = 15 fit; 9 would make 24: new row; 9+2 = 11; 16 would make 27: new row
    assert lay.row.tolist() == [0, 0, 0, 1, 1, 2]
    assert lay.src_offset.tolist() == [0, 5, 12, 0, 9, 0]
    assert lay.tgt_offset.tolist() == [0, 6, 10, 0, 9, 0]
    for side, lens, w in ((lay.src_offset, src, 16), (lay.tgt_offset, tgt, 16)):
        assert all(o + n <= w for o, n in zip(side, lens))
    assert row_layout([1, 1], [10, 10], 16).row.tolist() == [0, 1]  # the target side full
    # a pair joins the first open row with room on both sides, not only the last one
    lay = row_layout([10, 10, 5], [5, 5, 5], 16)
    assert lay.row.tolist() == [0, 1, 0] and lay.src_offset.tolist() == [0, 0, 10]
    # only the last OPEN_ROWS rows are open
    n = OPEN_ROWS + 1
    lay = row_layout([10] * n + [6], [1] * (n + 1), 16)
    assert lay.row.tolist() == [*range(n), 1]  # row 0 has room, but is closed


def test_layout_widens_to_the_longest_sentence_and_a_multiple_of_16():
    lay = row_layout([40, 3], [2, 2], 8)
    assert (lay.src_width, lay.tgt_width) == (48, 16)
    assert lay.rows == 1 and lay.row.tolist() == [0, 0]
    with pytest.raises(ValueError, match="width"):
        row_layout([1], [1], 0)


def test_pack_and_unpack_round_trip():
    B, L = 4, 6
    lengths = torch.tensor([6, 1, 4, 3])
    src, tgt = pack_lengths(lengths, lengths, 16, L, L)
    x = torch.arange(B * L).view(B, L) + 1
    real = torch.arange(L) < lengths[:, None]
    packed = src.pack(x)
    assert packed.shape == src.shape == (1, 16)
    assert int((packed > 0).sum()) == int(lengths.sum())
    assert torch.equal(src.unpack(packed, B, L), torch.where(real, x, 0))
    # segments and positions say which sentence and where in it
    assert src.segment[0, :8].tolist() == [1] * 6 + [2] + [3]
    assert src.position[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]


@pytest.mark.parametrize("kind", ["encoder self", "decoder self", "cross"])
def test_packed_attention_equals_padded_attention(kind):
    g = torch.Generator().manual_seed(0)
    B, S, T, h, d = 7, 9, 11, 2, 8
    src_len = torch.randint(1, S + 1, (B,), generator=g)
    tgt_len = torch.randint(1, T + 1, (B,), generator=g)
    src_len[0], tgt_len[1] = S, T  # the longest sentences are full
    src_side, tgt_side = pack_lengths(src_len, tgt_len, 16, S, T)
    Lq, Lk, q_side, k_side = {
        "encoder self": (S, S, src_side, src_side),
        "decoder self": (T, T, tgt_side, tgt_side),
        "cross": (T, S, tgt_side, src_side),
    }[kind]
    causal = kind == "decoder self"
    q = torch.randn(B, Lq, h, d, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Lk, h, d, generator=g, requires_grad=True) for _ in "kv")
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, L, h, d) -> (B, h, L, d)
    mask = None if causal else key_bias(padding_mask(torch.arange(S) < src_len[:, None]), q.dtype)
    padded = t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, is_causal=causal))
    bias = segment_bias(q_side.segment, k_side.segment, causal, q.dtype)
    out = F.scaled_dot_product_attention(
        t(q_side.pack(q)), t(k_side.pack(k)), t(k_side.pack(v)), attn_mask=bias
    )
    assert not out.isnan().any()
    packed = q_side.unpack(t(out), B, Lq)
    real_q = torch.arange(Lq) < (src_len if Lq == S and kind != "cross" else tgt_len)[:, None]
    real_q = real_q[:, :, None, None]
    assert torch.allclose(torch.where(real_q, packed, 0), torch.where(real_q, padded, 0), atol=1e-5)
    # the gradients of the real tokens agree too, and padding gets none
    grad = torch.randn(B, Lq, h, d, generator=g) * real_q
    want = torch.autograd.grad(padded, (q, k, v), grad)
    got = torch.autograd.grad(packed, (q, k, v), grad)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-5)


def test_segment_bias_rows_never_empty():
    seg = torch.tensor([[1, 1, 2, 0], [3, 0, 0, 0]])
    bias = segment_bias(seg, seg, True, torch.float32)
    assert bias.shape == (2, 1, 4, 4)
    assert (bias == 0).any(-1).all()  # every query sees some key
    allowed = (bias[0, 0] == 0).tolist()
    assert allowed[1] == [True, True, False, False]  # own segment, causal
    assert allowed[2] == [False, False, True, False]
    assert allowed[3] == [True, True, True, True]  # an empty slot sees all
    assert np.array_equal((bias[1, 0, 0] == 0).numpy(), [True, False, False, False])


def random_batch(B: int, S: int, T: int, seed: int = 0) -> Batch:
    """Pairs of random lengths (the longest of each side full), BOS 1, EOS 2, pad 0."""
    g = torch.Generator().manual_seed(seed)
    src_len, tgt_len = (
        torch.randint(1, S + 1, (B,), generator=g),
        torch.randint(1, T, (B,), generator=g),
    )
    src_len[0], tgt_len[-1] = S, T - 1
    src = torch.randint(3, 30, (B, S), generator=g) * (torch.arange(S) < src_len[:, None])
    y = torch.randint(3, 30, (B, T), generator=g)
    real = torch.arange(T) < (tgt_len + 1)[:, None]
    tgt_in = torch.cat([torch.ones(B, 1, dtype=torch.long), y[:, :-1]], 1) * real
    tgt_out = torch.where(torch.arange(T) == tgt_len[:, None], 2, y) * real
    return Batch(src, src != 0, tgt_in, tgt_out)


def test_pack_batch_keeps_every_token():
    batch = random_batch(9, 8, 10)
    packed = pack_batch(batch, 0, 16)
    for name in ("src", "tgt_in", "tgt_out"):
        want, got = getattr(batch, name), getattr(packed, name)
        assert sorted(want[want != 0].tolist()) == sorted(got[got != 0].tolist())
    assert torch.equal(packed.src_mask, packed.rows.src_segment > 0)
    assert int(packed.src_mask.sum()) == int(batch.src_mask.sum())
    assert packed.src.shape[0] < batch.src.shape[0]  # fewer rows than pairs


@pytest.mark.parametrize("width", [16, 32])
def test_transformer_on_packed_rows_equals_padded(width):
    """The model's loss and gradients on a batch in packed rows equal those on the padded
    batch: the segments keep every sentence to itself, its positions count from 0."""
    batch = random_batch(9, 8, 10)
    packed = pack_batch(batch, 0, width)
    torch.manual_seed(0)
    model = Transformer(30, 30, 0, d_model=32, n_heads=4, d_ff=64, n_enc_layers=2,
                        n_dec_layers=2, dropout=0.0)  # fmt: skip

    def loss_and_grads(b, **rows):
        model.zero_grad()
        loss = sequence_loss(model(b.src, b.src_mask, b.tgt_in, **rows), b.tgt_out, 0, 0.1)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = loss_and_grads(batch)
    got, got_grads = loss_and_grads(packed, rows=packed.rows)
    assert torch.allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # without the segments the rows' sentences would see each other: a different loss
    plain = sequence_loss(model(packed.src, packed.src_mask, packed.tgt_in), packed.tgt_out, 0, 0.1)
    assert not torch.allclose(plain, want, rtol=1e-3)


def test_packed_rows_need_sdpa_attention():
    model = Transformer(30, 30, 0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1,
                        n_dec_layers=1, attention={"kind": "additive"})  # fmt: skip
    packed = pack_batch(random_batch(3, 4, 5), 0, 16)
    with pytest.raises(ValueError, match="packed rows need scaled-dot-product attention"):
        model(packed.src, packed.src_mask, packed.tgt_in, rows=packed.rows)


@pytest.mark.parametrize(
    "overrides, device, width",
    [
        ([], "cuda", AUTO_CUDA_WIDTH),  # the default Transformer on a GPU: packed
        ([], "cuda:1", AUTO_CUDA_WIDTH),
        ([], "cpu", 0),  # the CPU's math attention is slower in rows
        (["model=rnn"], "cuda", 0),  # no rows for the RNN: padded, not refused
        (["model.attention.cross=additive"], "cuda", 0),
        (["model.attention.kind=dot"], "cuda", AUTO_CUDA_WIDTH),
        (["trainer.packed_rows=0"], "cuda", 0),
        (["trainer.packed_rows=64"], "cpu", 64),  # asked for: as asked
    ],
)
def test_packed_rows_auto_packs_the_transformer_on_cuda_only(compose, overrides, device, width):
    cfg = compose(overrides)
    assert cfg.trainer.packed_rows == ("auto" if "packed_rows" not in str(overrides) else width)
    takes_rows = getattr(trial_build(cfg.model), "takes_rows", False)
    assert resolve_width(cfg.trainer.packed_rows, takes_rows, device) == width


def test_mean_pair_len_counts_the_longer_side_and_its_end_token():
    assert mean_pair_len([3, 10], [5, 2]) == pytest.approx((5 + 10) / 2 + 1)
    assert mean_pair_len([], []) == 0.0


@pytest.mark.parametrize(
    "pair_len, width",
    [
        (18.0, AUTO_CUDA_WIDTH),  # Multi30k's pairs: about 7 to a row
        (AUTO_CUDA_WIDTH / MIN_PAIRS_PER_ROW, AUTO_CUDA_WIDTH),  # just MIN_PAIRS_PER_ROW
        (AUTO_CUDA_WIDTH / MIN_PAIRS_PER_ROW + 0.5, 0),  # fewer: padded
        (64.0, 0),  # pairs joined 4 at a time: rows were 9-16% slower on an H200
        (None, AUTO_CUDA_WIDTH),  # not known: taken as short
    ],
)
def test_auto_packs_only_pairs_short_enough_to_share_a_row(pair_len, width):
    assert resolve_width("auto", True, "cuda", pair_len) == width
    assert resolve_width("auto", True, "cpu", pair_len) == 0  # never on the CPU
    assert resolve_width(96, True, "cuda", pair_len) == 96  # a width asked for is kept


@pytest.mark.parametrize("length, width", [(16, AUTO_CUDA_WIDTH), (40, 0)])
def test_the_trainer_packs_by_its_training_split_lengths(caplog, length, width):
    """Trainer.choose_layout reads the training split's lengths (not valid's) for auto, and
    says in the log why a GPU run trains padded."""
    from types import SimpleNamespace

    from transformer.trainer import Trainer

    def split(n):
        return SimpleNamespace(src_lens=np.full(50, n), tgt_lens=np.full(50, n - 2))

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(data=SimpleNamespace(train_split="train"))
    trainer.t = SimpleNamespace(packed_rows="auto")
    trainer.splits = {"train": split(length), "valid": split(200 - length)}
    trainer.device = torch.device("cuda")  # a device object only: nothing runs on it
    with caplog.at_level("INFO", logger="transformer.trainer"):
        trainer.choose_layout(takes_rows=True)
    assert trainer.packed_rows == width
    assert ("training batches padded: the training pairs average 41.0 slots" in caplog.text) == (
        width == 0
    )
