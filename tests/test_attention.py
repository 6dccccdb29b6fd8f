import math

import pytest
import torch

from transformer.attention import MultiHeadAttention, causal_mask, padding_mask


def reference_mha(mha, x, memory, mask):
    """Multi-head attention written out in float64 from the paper's formulas."""

    def proj(w, b, t):
        return t.double() @ w.double().T + b.double()

    B, Tq, D = x.shape
    h, dh = mha.n_heads, mha.d_head
    (wq, wk, wv), (bq, bk, bv) = mha.in_proj.weight.chunk(3), mha.in_proj.bias.chunk(3)
    q = proj(wq, bq, x).view(B, Tq, h, dh).transpose(1, 2)
    k = proj(wk, bk, memory).view(B, -1, h, dh).transpose(1, 2)
    v = proj(wv, bv, memory).view(B, -1, h, dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, D)
    return proj(mha.out_proj.weight, mha.out_proj.bias, out)


def test_masks_shapes_and_values():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m[2, 2] and m[2, 0] and not m[2, 3]
    # Fewer queries than keys (a decoder step after a cache): queries sit at the end.
    assert causal_mask(2, T_k=4).tolist() == [[True, True, True, False], [True] * 4]
    src_mask = torch.tensor([[True, True, False]])
    assert padding_mask(src_mask).shape == (1, 1, 1, 3)


@pytest.mark.parametrize("h", [1, 4])
def test_cross_attention_matches_float64_reference(h):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, h).eval()
    x, mem = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    src_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()
    out, _ = mha(x, memory=mem, mask=padding_mask(src_mask))
    ref = reference_mha(mha, x, mem, padding_mask(src_mask))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_causal_self_attention_matches_reference_and_ignores_future():
    torch.manual_seed(1)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)
    out, _ = mha(x, causal=True)
    ref = reference_mha(mha, x, x, causal_mask(6))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)  # change the future
    out2, _ = mha(x2, causal=True)
    torch.testing.assert_close(out[:, :4], out2[:, :4])


def test_padded_keys_get_zero_weight_and_rows_sum_to_one():
    torch.manual_seed(2)
    mha = MultiHeadAttention(8, 2).eval()
    mha.need_weights = True
    x, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    src_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    mha(x, memory=mem, mask=padding_mask(src_mask))
    w = mha.last_weights  # (B, h, Tq, Tk)
    assert torch.all(w[0, :, :, 3:] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))


def test_d_model_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by model.n_heads=3"):
        MultiHeadAttention(10, 3)


def test_checkpoints_with_separate_qkv_layers_still_load():
    """State dicts written before W_q, W_k, W_v were stacked into ``in_proj``."""
    torch.manual_seed(2)
    D = 16
    old = {f"{p}_proj.{t}": torch.randn(D, D) if t == "weight" else torch.randn(D)
           for p in ("q", "k", "v", "out") for t in ("weight", "bias")}  # fmt: skip
    mha = MultiHeadAttention(D, 4).eval()
    mha.load_state_dict(old)  # strict: nothing missing, nothing left over
    x, mem = torch.randn(2, 5, D), torch.randn(2, 7, D)
    out, _ = mha(x, memory=mem)

    def proj(p, t):
        return t.double() @ old[f"{p}_proj.weight"].double().T + old[f"{p}_proj.bias"].double()

    q, k, v = (proj(p, t).view(2, -1, 4, 4).transpose(1, 2) for p, t in zip("qkv", (x, mem, mem)))
    ref = ((q @ k.transpose(-1, -2) / 2).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, D)
    torch.testing.assert_close(out.double(), proj("out", ref), atol=1e-5, rtol=1e-4)


def test_transformer_initialises_each_projection_with_its_own_xavier_fans():
    from transformer.transformer_model import Transformer

    torch.manual_seed(0)
    D = 256
    model = Transformer(50, 50, 0, d_model=D, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    bound = math.sqrt(6 / (D + D))  # a D x D matrix; the stacked (3D, D) one would be 0.71x
    for block in model.encoder[0].self_attn.in_proj.weight.detach().chunk(3):
        assert 0.99 * bound < block.abs().max() <= bound
        assert abs(block.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert not model.encoder[0].self_attn.in_proj.bias.any()
