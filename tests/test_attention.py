import math

import pytest
import torch

from transformer.attention import MultiHeadAttention, causal_mask, padding_mask


def reference_mha(mha, x, memory, mask):
    """Multi-head attention written out in float64 from the paper's formulas."""

    def proj(layer, t):
        return t.double() @ layer.weight.double().T + layer.bias.double()

    B, Tq, D = x.shape
    h, dh = mha.n_heads, mha.d_head
    q = proj(mha.q_proj, x).view(B, Tq, h, dh).transpose(1, 2)
    k = proj(mha.k_proj, memory).view(B, -1, h, dh).transpose(1, 2)
    v = proj(mha.v_proj, memory).view(B, -1, h, dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, D)
    return proj(mha.out_proj, out)


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
