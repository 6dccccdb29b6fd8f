"""The fused projection + loss (loss.py) against the plain one, and the CPU dropout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.dropout import Dropout, dropout
from transformer.loss import projected_loss, sequence_loss
from transformer.rnn_model import BahdanauRNN
from transformer.transformer_model import Transformer

PAD = 0


def batch(B=5, T=7, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    tgt = torch.randint(1, V, (B, T), generator=g)
    for b, n in enumerate([7, 3, 5, 1, 6]):  # ragged lengths: pad after n tokens
        tgt[b, n:] = PAD
    return hidden, tgt


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1024])
def test_projected_loss_matches_the_plain_loss_and_its_gradients(smoothing, bias, chunk_rows):
    hidden, tgt = batch()
    proj = nn.Linear(16, 50, bias=bias).double()
    with torch.no_grad():
        proj.weight[PAD] = 0.0  # as a tied pad embedding is
    grads = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        proj.zero_grad()
        if fused:
            loss = projected_loss(h, proj, tgt, PAD, smoothing, chunk_rows)
        else:
            logits = proj(h).reshape(-1, 50)  # float64 (sequence_loss would make it float32)
            loss = F.cross_entropy(
                logits,
                tgt.reshape(-1),
                ignore_index=PAD,
                label_smoothing=smoothing,
                reduction="sum",
            )
        (2.5 * loss).backward()  # a scaled loss: the backward must scale the stored gradients
        grads.append([loss.detach(), h.grad, proj.weight.grad] + ([proj.bias.grad] if bias else []))
    for plain, fused in zip(*grads):
        assert fused.dtype == plain.dtype == torch.float64
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
    assert grads[1][1][tgt == PAD].abs().sum() == 0  # padding rows get no gradient


def test_projected_loss_without_grad_and_under_autocast():
    hidden, tgt = batch()
    torch.manual_seed(0)
    proj = nn.Linear(16, 50, bias=False)
    hidden = hidden.float()
    with torch.no_grad():
        plain = sequence_loss(proj(hidden), tgt, PAD, 0.1)
        assert torch.allclose(projected_loss(hidden, proj, tgt, PAD, 0.1, 3), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = hidden.clone().requires_grad_()
        fused = projected_loss(h, proj, tgt, PAD, 0.1, 3)
        fused.backward()
        reference = sequence_loss(proj(hidden), tgt, PAD, 0.1)  # bf16 product, fp32 softmax
    assert fused.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=0.0)  # 1e-7 apart here
    # The products ran in bf16, as autocast says: the loss and hidden gradient are those of
    # bf16 inputs to the bit, not those of fp32 products
    proj16 = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        proj16.weight.copy_(proj.weight)
    h16 = hidden.bfloat16().requires_grad_()
    bf16 = projected_loss(h16, proj16, tgt, PAD, 0.1, 3)
    bf16.backward()
    assert torch.equal(fused, bf16) and torch.equal(h.grad, h16.grad.float())
    assert not torch.equal(fused, projected_loss(hidden, proj, tgt, PAD, 0.1, 3).detach())


@pytest.mark.parametrize("model", ["transformer", "rnn"])
def test_models_return_the_features_their_out_proj_maps_to_logits(model):
    torch.manual_seed(0)
    if model == "transformer":
        m = Transformer(40, 40, PAD, d_model=32, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    else:
        m = BahdanauRNN(40, 40, PAD, emb_dim=16, hidden_size=24)
    m.eval()
    src, tgt_in = torch.randint(1, 40, (3, 6)), torch.randint(1, 40, (3, 5))
    logits = m(src, src != PAD, tgt_in)
    features = m(src, src != PAD, tgt_in, project=False)
    torch.testing.assert_close(m.out_proj(features), logits)


def test_cpu_dropout_is_an_inverted_bernoulli_mask_shared_by_the_backward():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.3)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - 0.3) < 0.005  # 1e6 draws: std of the fraction ~0.0005
    # each 64-bit draw feeds four neighbouring elements; each of the four drops at rate p
    # (the top one would not if its always-zero sign bit were used)
    for lane in range(4):
        assert abs(dropped.view(-1)[lane::4].mean().item() - 0.3) < 0.006
    kept = y[y != 0]
    # unbiased: the scale is that of the rounded p (round(0.3 * 2**15) = 9830 levels of
    # 2**15 dropped), 1.7e-5 from 1 / 0.7, which the statistics below cannot tell apart
    assert torch.all(kept == kept[0]) and kept[0].item() == pytest.approx(2**15 / (2**15 - 9830))
    assert kept[0].item() != pytest.approx(1 / 0.7)
    assert abs(y.mean().item() - 1) < 0.003
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x is the same scaled mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.3), y)  # torch's generator: seeded masks repeat
    assert not torch.equal(dropout(x, 0.3), y)
    layer = Dropout(0.3)
    assert layer(x) is not x and layer.eval()(x) is x and dropout(x, 0.0) is x
    assert repr(layer) == "Dropout(p=0.3, inplace=False)"


def test_cpu_dropout_keeps_the_level_equal_to_round_p_times_2_15():
    """The documented rule, element by element: level >= round(p * 2**15) is kept, where each
    64-bit draw of the seeded generator gives four 15-bit levels (its 16-bit lanes' low bits).
    At p = 3 * 2**-15, keeping only levels above 3 would drop 4/3 as many elements."""
    n, k = 1 << 20, 3
    torch.manual_seed(1)
    y = dropout(torch.ones(n), k / 2**15)
    torch.manual_seed(1)
    words = torch.empty(n // 4, dtype=torch.int64).random_()
    levels = words.view(torch.int16).bitwise_and(2**15 - 1)
    assert (levels == k).sum() > 10  # the boundary level occurs (~32 times)
    assert torch.equal(y == 0, levels < k)
