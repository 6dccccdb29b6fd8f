import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from transformer.attention import (
    MultiHeadAttention,
    as_bool,
    causal_mask,
    key_bias,
    padding_mask,
)
from transformer.transformer_model import Transformer


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
    torch.manual_seed(0)
    D = 256
    model = Transformer(50, 50, 0, d_model=D, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    bound = math.sqrt(6 / (D + D))  # a D x D matrix; the stacked (3D, D) one would be 0.71x
    for block in model.encoder[0].self_attn.in_proj.weight.detach().chunk(3):
        assert 0.99 * bound < block.abs().max() <= bound
        assert abs(block.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert not model.encoder[0].self_attn.in_proj.bias.any()


def test_key_bias_is_the_additive_mask_with_aligned_rows():
    mask = padding_mask(torch.tensor([[True] * 3 + [False] * 2, [True] * 5]))
    bias = key_bias(mask, torch.bfloat16)
    assert bias.shape == (2, 1, 1, 5) and bias.dtype == torch.bfloat16
    assert bias.stride() == (16, 16, 16, 1)  # what SDPA's memory-efficient kernel takes as is
    assert bias[0, 0, 0].tolist() == [0.0] * 3 + [float("-inf")] * 2
    assert torch.equal(as_bool(bias), mask) and as_bool(mask) is mask


def tiny_transformer_and_batch():
    """A 2+2-layer Transformer without dropout; src (3, 7) with two padded rows, tgt (3, 5)."""
    torch.manual_seed(0)
    model = Transformer(
        11, 11, pad_id=0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=2, n_dec_layers=2,
        dropout=0.0,
    )  # fmt: skip
    src_mask = torch.ones(3, 7, dtype=torch.bool)
    src_mask[1, 4:], src_mask[2, 2:] = False, False
    return model, torch.randint(3, 11, (3, 7)), src_mask, torch.randint(3, 11, (3, 5))


@pytest.mark.parametrize("autocast", [False, True])
def test_transformer_with_additive_key_masks_equals_bool_masks(autocast):
    """The additive masks made once per pass give the same forward and backward as bool
    masks handed to every layer (the model's attention_dtype matches autocast's on)."""
    model, src, src_mask, tgt = tiny_transformer_and_batch()

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(src, src_mask, tgt)
        out.float().square().sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    assert model.bias_roles == {"encoder", "cross"}
    with_bias = run()
    model.bias_roles = set()  # bool masks, converted by SDPA in each call
    with_bool = run()
    torch.testing.assert_close(with_bias, with_bool, atol=0, rtol=0)


def test_the_additive_key_masks_take_the_dtype_attention_runs_in():
    """Under bf16 autocast the key masks are bf16, as SDPA's queries are there: CUDA's
    memory-efficient kernel refuses a bias of another dtype than the query's. The CPU's
    SDPA takes an fp32 mask with bf16 queries alike, so the test above cannot tell."""
    model, src, src_mask, _ = tiny_transformer_and_batch()
    x = torch.zeros(3, 7, 16)
    for role in ("encoder", "cross"):
        assert model.key_mask(src_mask, role, x).dtype == torch.float32
        assert model.key_mask(src_mask, role, x.double()).dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.key_mask(src_mask, role, x).dtype == torch.bfloat16


class Dispatched(TorchDispatchMode):
    """How many times each operator was dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_pass_slices_no_parameter():
    """The stacked q/k/v projections are used whole (self-attention) or split once per
    parameter (cross-attention): no slice's backward (a full-size zero-filled gradient and a
    copy each) in the pass, and the gradients are those of splitting for each use."""
    model, src, src_mask, tgt = tiny_transformer_and_batch()
    with Dispatched() as ops:
        model(src, src_mask, tgt).square().sum().backward()
    assert ops.counts["slice_backward"] == 0 and ops.counts["cat"] > 0
    joined = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enc = model.encode(src, src_mask)
    del enc.extra["cross_q"]  # the decoder splits its query rows again
    model.decode_prefix(tgt, enc).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(joined[name], p.grad, msg=name)


def test_cross_keys_values_of_all_layers_in_one_product_equal_each_layers_own():
    model, src, src_mask, _ = tiny_transformer_and_batch()
    enc = model.encode(src, src_mask)
    own = [kv for layer in model.decoder for kv in layer.cross_attn.project_kv(enc.memory)]
    assert len(enc.extra["cross_kv"]) == len(own) == 4
    for stacked, alone in zip(enc.extra["cross_kv"], own):
        torch.testing.assert_close(stacked, alone)


def test_a_joint_vocabulary_is_looked_up_once_per_training_pass():
    """Source and target through one lookup: one gradient scatter into the shared table, and
    the gradients of looking them up apart."""
    model, src, src_mask, tgt = tiny_transformer_and_batch()
    assert model.src_embed is model.tgt_embed
    with Dispatched() as ops:
        model(src, src_mask, tgt).square().sum().backward()
    assert ops.counts["embedding"] == 1 and ops.counts["embedding_dense_backward"] == 1
    joint = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.decode_prefix(tgt, model.encode(src, src_mask)).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(joint[name], p.grad, msg=name)
