import pytest
import torch

from transformer.transformer_model import Transformer

PAD = 0


def padded_batch(V=50, B=3, S=7, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    src[1, 5:] = PAD
    src[2, 3:] = PAD
    tgt = torch.randint(4, V, (B, T), generator=g)
    return src, src != PAD, tgt


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("width,heads", [(32, 4), (9, 3)])  # an odd width too
def test_unrolled_decode_step_equals_forward(norm, width, heads):
    torch.manual_seed(0)
    model = Transformer(
        50, 50, PAD, d_model=width, n_heads=heads, d_ff=64, n_enc_layers=2, n_dec_layers=2,
        norm=norm,
    ).eval()  # fmt: skip
    src, src_mask, tgt = padded_batch()
    full = model(src, src_mask, tgt)  # (B, T, V)
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    for t in range(tgt.shape[1]):
        logits, state = model.decode_step(tgt[:, t], enc, state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)


def test_reorder_permutes_decoding():
    torch.manual_seed(0)
    model = Transformer(50, 50, PAD, d_model=32, n_heads=4, d_ff=64).eval()
    src, src_mask, tgt = padded_batch()
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    _, state = model.decode_step(tgt[:, 0], enc, state)
    perm = torch.tensor([2, 0, 1])
    logits_perm, _ = model.decode_step(tgt[perm, 1], enc.reorder(perm), state.reorder(perm))
    logits, _ = model.decode_step(tgt[:, 1], enc, state)
    torch.testing.assert_close(logits_perm, logits[perm], atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    model = Transformer(50, 50, PAD, d_model=32, n_heads=4, d_ff=64).eval()
    src, src_mask, tgt = padded_batch()
    extra = torch.cat([src, torch.full((3, 4), PAD)], 1)
    torch.testing.assert_close(
        model(src, src_mask, tgt), model(extra, extra != PAD, tgt), atol=1e-5, rtol=1e-4
    )


def test_embeddings_tied_across_all_three_with_joint_vocab():
    model = Transformer(40, 40, PAD, d_model=16, n_heads=2, d_ff=32)
    assert model.out_proj.weight is model.tgt_embed.weight
    assert model.src_embed is model.tgt_embed
    separate = Transformer(
        40, 30, PAD, d_model=16, n_heads=2, d_ff=32, share_src_tgt_embeddings=False
    )
    assert separate.src_embed is not separate.tgt_embed
    assert separate.out_proj.weight is separate.tgt_embed.weight


def test_bad_model_args_are_clear_errors():
    with pytest.raises(ValueError, match="joint vocabulary"):
        Transformer(40, 30, PAD, d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="model.norm"):
        Transformer(40, 40, PAD, d_model=16, n_heads=2, norm="middle")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=0), "model.d_model must be an integer >= 1, got 0"),
        (dict(d_ff=16.0), "model.d_ff must be an integer >= 1, got 16.0"),
        (dict(n_dec_layers=0), "model.n_dec_layers must be an integer >= 1, got 0"),
        (dict(n_enc_layers=-1), "model.n_enc_layers must be an integer >= 0, got -1"),
        (dict(dropout=1.0), r"model.dropout must be a number in \[0, 1\), got 1.0"),
        (dict(attn_dropout=-0.1), r"model.attn_dropout must be a number in \[0, 1\)"),
        (dict(act_dropout="0.1"), r"model.act_dropout must be a number in \[0, 1\), got '0.1'"),
        (dict(tie_embeddings="no"), "model.tie_embeddings must be true or false, got 'no'"),
        (dict(tie_embeddings=1), "model.tie_embeddings must be true or false, got 1"),
    ],
)
def test_sizes_and_dropouts_out_of_range_name_their_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Transformer(40, 40, PAD, **(dict(d_model=16, n_heads=2, d_ff=32) | kwargs))


def test_no_encoder_layer_attends_to_the_embeddings():
    """With no encoder layer the memory is the source's scaled embeddings plus positions,
    through the final norm, and the translation depends on the source."""
    torch.manual_seed(0)
    model = Transformer(40, 40, PAD, d_model=16, n_heads=2, d_ff=32, n_enc_layers=0).eval()
    src = torch.tensor([[5, 6, 7]])
    enc = model.encode(src, src != PAD)
    torch.testing.assert_close(enc.memory, model.enc_norm(model.positions(model.src_embed(src))))
    tgt_in = torch.tensor([[1, 8]])
    logits = model(src, src != PAD, tgt_in)
    assert logits.shape == (1, 2, 40) and torch.isfinite(logits).all()
    other = torch.tensor([[9, 10, 11]])
    assert not torch.allclose(model(other, other != PAD, tgt_in), logits)


def test_layer_formulas_written_out():
    # The other model tests compare one path of the model with another; these pin the
    # formulas themselves (Vaswani et al. 2017, Sections 3.4, 3.1; pre-norm: Xiong et al. 2020).
    from transformer.layers import FeedForward, ScaledEmbedding, Sublayer

    torch.manual_seed(0)
    emb = ScaledEmbedding(10, 16)
    ids = torch.tensor([[1, 4, 9]])
    torch.testing.assert_close(emb(ids), emb.weight[ids] * 4.0)
    x = torch.randn(2, 3, 16)

    def f(h):
        return h * 2.0 + 1.0, None

    for pre_norm in (True, False):
        sub = Sublayer(16, 0.0, pre_norm)
        with torch.no_grad():
            sub.norm.weight.uniform_(0.5, 1.5)
            sub.norm.bias.uniform_(-0.5, 0.5)
        ln = torch.nn.functional.layer_norm(x, (16,), sub.norm.weight, sub.norm.bias)
        expected = x + f(ln)[0] if pre_norm else sub.norm(x + f(x)[0])
        torch.testing.assert_close(sub(x, f)[0], expected)
        # dropout on the sublayer's output, before the residual sum (Section 5.4)
        sub.dropout.p = 0.5
        torch.manual_seed(2)
        got = sub(x, f)[0]
        torch.manual_seed(2)
        dropped = sub.dropout(f(ln if pre_norm else x)[0])
        torch.testing.assert_close(got, x + dropped if pre_norm else sub.norm(x + dropped))
    # dropout after the activation, inside the feed-forward network (train mode)
    ffn = FeedForward(16, 32, act_dropout=0.5).train()
    torch.manual_seed(1)
    got = ffn(x)
    torch.manual_seed(1)
    hidden = torch.relu(ffn.fc1(x))
    torch.testing.assert_close(got, ffn.fc2(ffn.act_dropout(hidden)))
    assert not torch.allclose(got, ffn.fc2(hidden))


def test_the_pad_rows_start_at_zero_and_positions_end_at_max_positions():
    model = Transformer(20, 20, 0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1,
                        n_dec_layers=1, max_positions=8)  # fmt: skip
    assert not model.tgt_embed.weight[0].any() and model.tgt_embed.weight[1].any()
    x = torch.zeros(1, 8, 16)
    assert model.positions(x).shape == (1, 8, 16)  # exactly max_positions
    with pytest.raises(ValueError, match="9 positions exceeds model.max_positions=8"):
        model.positions(torch.zeros(1, 9, 16))


def test_an_odd_model_width_has_one_sine_more_than_cosines():
    """The sinusoids had one cosine column fewer than frequencies at odd d_model: a shape
    error from inside Hydra's instantiation instead of a model (d=9, 3 heads of 3 is valid;
    its decoding is in test_unrolled_decode_step_equals_forward)."""
    import math

    model = Transformer(50, 50, PAD, d_model=9, n_heads=3, d_ff=16, n_enc_layers=1,
                        n_dec_layers=1, max_positions=16)  # fmt: skip
    pe = model.positions.pe
    assert pe.shape == (16, 9)
    assert pe[3, 8].item() == pytest.approx(math.sin(3 * 10000 ** (-8 / 9)))
    assert pe[3, 7].item() == pytest.approx(math.cos(3 * 10000 ** (-6 / 9)))


def test_dropout_sits_where_the_paper_puts_it_and_acts_in_training_only(monkeypatch):
    """Vaswani et al. 2017, Section 5.4: dropout on each sublayer's output before the residual
    sum, and on the embeddings plus positions of both stacks; here also on the attention
    weights (attn_dropout, SDPA's dropout_p) and after the feed-forward activation
    (act_dropout). In eval mode the model is exactly the dropout-free one."""
    import torch.nn.functional as F

    from transformer.dropout import Dropout

    src, src_mask, tgt = padded_batch()
    args = dict(d_model=32, n_heads=4, d_ff=64, n_enc_layers=2, n_dec_layers=2)
    torch.manual_seed(0)
    plain = Transformer(50, 50, PAD, **args, dropout=0.0).eval()
    torch.manual_seed(0)
    model = Transformer(50, 50, PAD, **args, dropout=0.3, attn_dropout=0.2, act_dropout=0.1)
    sites, attn = [], []
    for m in model.modules():
        if isinstance(m, Dropout):
            m.register_forward_hook(lambda mod, a, out: sites.append(mod.p if mod.training else 0))
    sdpa = F.scaled_dot_product_attention

    def spy(*a, dropout_p=0.0, **kw):
        attn.append(dropout_p)
        return sdpa(*a, dropout_p=dropout_p, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = model.eval()(src, src_mask, tgt)
    assert set(attn) == {0.0}
    torch.testing.assert_close(got, plain(src, src_mask, tgt), atol=0, rtol=0)
    sites.clear(), attn.clear()
    inputs = []  # the embeddings' dropout takes their sums with the positions
    model.embed_dropout.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    model.train()(src, src_mask, tgt)
    assert len(inputs) == 2  # the source's, then the target's
    for ids, got in zip((src, tgt), inputs):
        torch.testing.assert_close(got, model.positions(model.tgt_embed(ids)))
    # embeddings of both stacks; 2 sublayers per encoder layer, 3 per decoder layer
    assert sorted(sites) == [0.1] * 4 + [0.3] * (2 + 2 * 2 + 3 * 2)
    assert attn == [0.2] * (2 + 2 * 2)  # every self- and cross-attention
