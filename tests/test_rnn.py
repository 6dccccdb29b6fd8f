"""BahdanauRNN: decode_step == forward, masked attention, reorder, padding, arg checks."""

from __future__ import annotations

import pytest
import torch

from transformer.rnn_model import ATTENTIONS, BahdanauRNN
from transformer.seq2seq import OnHost

PAD = 0
SRC_V, TGT_V = 23, 19
LENGTHS = (5, 2, 7, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: on a busy CPU, extra threads cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(attention: str, **kwargs) -> BahdanauRNN:
    torch.manual_seed(0)
    args = {"emb_dim": 8, "hidden_size": 12, "enc_layers": 2, "dec_layers": 2, "dropout": 0.3}
    args.update(kwargs)
    model = BahdanauRNN(SRC_V, TGT_V, PAD, attention=attention, **args)
    return model.double().eval()


def make_batch(extra_pad: int = 0):
    """Random padded batch; real tokens avoid PAD; ``extra_pad`` appends pad columns."""
    g = torch.Generator().manual_seed(1)
    B, S = len(LENGTHS), max(LENGTHS)
    src = torch.randint(PAD + 1, SRC_V, (B, S), generator=g)
    tgt_in = torch.randint(PAD + 1, TGT_V, (B, 6), generator=g)
    src = torch.cat([src, src.new_full((B, extra_pad), PAD)], dim=1)  # (B, S + extra_pad)
    src_mask = torch.arange(S + extra_pad)[None, :] < torch.tensor(LENGTHS)[:, None]
    return src.masked_fill(~src_mask, PAD), src_mask, tgt_in


def unroll(model, src, src_mask, tgt_in):
    """Greedy-style incremental decoding fed with tgt_in: logits (B,T,V), weights (B,T,S)."""
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    logits, attns = [], []
    for t in range(tgt_in.shape[1]):
        step_logits, state = model.decode_step(tgt_in[:, t], enc, state)
        logits.append(step_logits)
        attns.append(state.tensors["attn"])
    return torch.stack(logits, 1), torch.stack(attns, 1)


@pytest.fixture(params=ATTENTIONS)
def model(request):
    return make_model(request.param)


def test_decode_step_matches_forward(model):
    src, src_mask, tgt_in = make_batch()
    with torch.no_grad():
        expected = model(src, src_mask, tgt_in)
        got, attn = unroll(model, src, src_mask, tgt_in)
        align = model.attention_weights(src, src_mask, tgt_in)
    assert expected.shape == (len(LENGTHS), tgt_in.shape[1], TGT_V)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, align, atol=1e-5, rtol=0)


def test_attention_weights_masked_and_normalised(model):
    src, src_mask, tgt_in = make_batch(extra_pad=2)
    align = model.attention_weights(src, src_mask, tgt_in)  # (B, T, S)
    assert align.shape == (*tgt_in.shape, src.shape[1])
    torch.testing.assert_close(align.sum(-1), torch.ones_like(align[..., 0]))
    pad = ~src_mask[:, None, :].expand_as(align)
    assert torch.all(align[pad] == 0)
    assert torch.all(align[~pad] > 0)


def test_reorder_permutes_decoding(model):
    src, src_mask, tgt_in = make_batch()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        full, _ = unroll(model, src, src_mask, tgt_in)
        enc = model.encode(src, src_mask)
        state = model.init_state(enc)
        _, state = model.decode_step(tgt_in[:, 0], enc, state)
        enc, state = enc.reorder(perm), state.reorder(perm)
        assert state.tensors["attn"].shape == (len(perm), src.shape[1])
        rest = []
        for t in range(1, tgt_in.shape[1]):
            step_logits, state = model.decode_step(tgt_in[perm, t], enc, state)
            rest.append(step_logits)
    assert state.step == tgt_in.shape[1]
    torch.testing.assert_close(torch.stack(rest, 1), full[perm, 1:], atol=1e-10, rtol=0)


def test_extra_source_padding_is_invisible(model):
    src, src_mask, tgt_in = make_batch()
    src2, src_mask2, _ = make_batch(extra_pad=3)
    assert torch.equal(src2[:, : src.shape[1]], src)
    with torch.no_grad():
        a = model(src, src_mask, tgt_in)
        b = model(src2, src_mask2, tgt_in)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_train_mode_backward_and_tying():
    model = make_model("additive", share_src_tgt_embeddings=False).float().train()
    assert model.out_proj.weight is model.tgt_embed.weight
    src, src_mask, tgt_in = make_batch()
    model(src, src_mask, tgt_in).logsumexp(-1).mean().backward()
    assert model.tgt_embed.weight.grad is not None
    assert model.attention.key_proj.weight.grad is not None
    untied = BahdanauRNN(
        20, 20, PAD, emb_dim=8, hidden_size=12, tie_embeddings=False, share_src_tgt_embeddings=True
    )
    assert untied.src_embed is untied.tgt_embed
    assert untied.out_proj.weight is not untied.tgt_embed.weight


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention": "bilinear"}, "additive"),
        ({"share_src_tgt_embeddings": True}, "joint vocabulary"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"dec_layers": 0}, "dec_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"pad_id": TGT_V}, "pad_id"),
        ({"hidden_size": 12.5}, "model.hidden_size must be an integer >= 1, got 12.5"),
        ({"emb_dim": "8"}, "model.emb_dim must be an integer >= 1, got '8'"),
        ({"tie_embeddings": "maybe"}, "model.tie_embeddings must be true or false, got 'maybe'"),
    ],
)
def test_bad_args_raise(kwargs, match):
    args = {"emb_dim": 8, "hidden_size": 12, "pad_id": PAD}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BahdanauRNN(SRC_V, TGT_V, **args)


def test_dot_is_general_with_a_bias_the_softmax_cancels():
    """``dot`` projects the 2H-wide encoder states to H with a bias b; s^T b is the same for
    every source position, so b moves no weight, no output and gets no gradient: ``dot``
    trains the same functions as ``general`` (the docstring and rnn.yaml say so)."""
    torch.manual_seed(0)
    model = make_model("dot", dropout=0.0)
    src, src_mask, tgt_in = make_batch()
    logits, weights = unroll(model, src, src_mask, tgt_in)
    logits.logsumexp(-1).sum().backward()
    bias = model.attention.key_proj.bias
    assert bias.grad.abs().max() < 1e-6 < model.attention.key_proj.weight.grad.abs().max()
    with torch.no_grad():
        bias.add_(torch.randn_like(bias) * 10)
        moved, moved_weights = unroll(model, src, src_mask, tgt_in)
    torch.testing.assert_close(moved_weights, weights, atol=1e-5, rtol=0)
    torch.testing.assert_close(moved, logits.detach(), atol=1e-4, rtol=0)


def test_empty_source_raises():
    model = make_model("dot")
    src = torch.full((2, 3), PAD)
    src_mask = torch.zeros(2, 3, dtype=torch.bool)
    src_mask[0, 0] = True
    with pytest.raises(ValueError, match="at least one real token"):
        model.encode(src, src_mask)


def test_the_decoder_starts_from_the_backward_state_at_the_first_token():
    # Bahdanau et al. 2014, A.2.2: s_0 = tanh(W_s h_1<-), h_1<- the backward GRU's state at
    # token 1: the second half of the top layer's annotation of the first token.
    model = make_model("additive", dropout=0.0)
    src, src_mask, _ = make_batch()
    enc = model.encode(src, src_mask)
    H = model.hidden_size
    torch.testing.assert_close(enc.extra["summary"], enc.memory[:, 0, H:])


def gru_cell64(cell, x, h):
    """torch.nn.GRUCell written out (Cho et al. 2014): gates r, z, candidate n."""
    w_ih, w_hh = cell.weight_ih.double(), cell.weight_hh.double()
    b_ih, b_hh = cell.bias_ih.double(), cell.bias_hh.double()
    i_r, i_z, i_n = (x @ w_ih.T + b_ih).chunk(3, -1)
    h_r, h_z, h_n = (h @ w_hh.T + b_hh).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def rnnsearch64(model, enc, tgt_in):
    """Teacher-forced logits (B, T, V) of the RNNsearch decoder, in float64 from the module
    docstring's equations (Bahdanau et al. 2014, Appendix A), one sentence position at a
    time, given the encoder's annotations h_j: s_0 = tanh(W_s h_1<-) for every layer; the
    top s_{i-1} scores every h_j (additive v^T tanh(W s + U h_j + b), or s^T (P h_j + b));
    softmax over real tokens; c_i = sum_j a_ij h_j; the cells take [E y_{i-1}; c_i], layer
    l its own s^l_{i-1}; t_i = maxout_2(L_o [s_i; c_i; E y_{i-1}]); logits W_o t_i + b_o."""
    p = {n: t.double() for n, t in model.state_dict().items()}  # tied weights under each name
    H, L = model.hidden_size, model.dec_layers
    memory, mask = enc.memory.double(), enc.src_mask  # (B, S, 2H), (B, S)
    B = memory.shape[0]
    h1_back = memory[:, 0, H:]  # the backward GRU's state at the first token
    s = list(torch.tanh(h1_back @ p["bridge.weight"].T + p["bridge.bias"]).view(B, L, H).unbind(1))
    keys = memory @ p["attention.key_proj.weight"].T
    if "attention.key_proj.bias" in p:
        keys = keys + p["attention.key_proj.bias"]
    out = []
    for i in range(tgt_in.shape[1]):
        emb = p["tgt_embed.weight"][tgt_in[:, i]]  # (B, E)
        if model.attention.kind == "additive":
            w_s = s[-1] @ p["attention.query_proj.weight"].T  # (B, H)
            e = torch.tanh(w_s[:, None] + keys) @ p["attention.score_proj.weight"][0]  # (B, S)
        else:
            e = (keys * s[-1][:, None]).sum(-1)
        a = e.masked_fill(~mask, float("-inf")).softmax(-1)
        c = (a[:, :, None] * memory).sum(1)  # (B, 2H)
        x = torch.cat([emb, c], -1)
        for layer, cell in enumerate(model.decoder):
            s[layer] = x = gru_cell64(cell, x, s[layer])
        t = torch.cat([s[-1], c, emb], -1) @ p["readout.weight"].T + p["readout.bias"]
        t = torch.maximum(t[:, 0::2], t[:, 1::2])  # maxout over adjacent pairs
        out.append(t @ p["out_proj.weight"].T + p["out_proj.bias"])
    return torch.stack(out, 1)


def test_forward_follows_the_rnnsearch_equations_written_out(model):
    """The other tests compare one path of the model with another; this pins the decoder's
    formulas: which state attends, each layer's own recurrent state, the tanh bridge, the
    query in the additive score, the context as input, the maxout readout."""
    src, src_mask, tgt_in = make_batch(extra_pad=1)
    with torch.no_grad():
        enc = model.encode(src, src_mask)
        expected = rnnsearch64(model, enc, tgt_in)
        got = model.decode_prefix(tgt_in, enc)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_dropout_on_every_site_the_docstring_names_in_training_only():
    """Dropout on the source and target embeddings, the encoder states, between decoder
    layers and on the deep output: one call per site per pass (the between-layer one per
    step), each at the model's rate; none acts in eval mode (the test above)."""
    from transformer.dropout import Dropout

    model = make_model("additive", dec_layers=3).train()
    src, src_mask, tgt_in = make_batch()
    rates = []
    for m in model.modules():
        if isinstance(m, Dropout):
            m.register_forward_hook(lambda mod, args, out: rates.append(mod.p))
    model(src, src_mask, tgt_in)
    T, L = tgt_in.shape[1], model.dec_layers
    assert rates == [0.3] * (3 + T * (L - 1) + 1)


def test_training_dropout_sits_before_the_keys_and_right_before_the_output():
    """In training the attention keys are projected from the dropped-out annotations, the
    ones the context is made of, and the deep output's dropout follows its maxout, right
    before the output projection (the test above counts the sites, not their places)."""
    model = make_model("additive").train()
    src, src_mask, tgt_in = make_batch()
    outputs = []
    model.dropout.register_forward_hook(lambda mod, args, out: outputs.append(out))
    enc = model.encode(src, src_mask)
    memory = outputs[1]  # after the source embeddings' dropout: the annotations'
    assert torch.equal(enc.memory, memory)
    torch.testing.assert_close(enc.extra["keys"], model.attention.project_keys(memory))
    assert torch.equal(model.decode_prefix(tgt_in, enc, project=False), outputs[-1])


def test_source_lengths_counted_on_the_host_give_the_same_model():
    """``src_lengths`` (what the trainer counts on the host) packs the source as the mask
    does, so training needs no copy of the lengths back from the device."""
    model = make_model("additive")
    src, src_mask, tgt_in = make_batch(extra_pad=2)
    given = model(src, src_mask, tgt_in, src_lengths=torch.tensor(LENGTHS))
    assert torch.equal(given, model(src, src_mask, tgt_in))
    with pytest.raises(ValueError, match=r"src_lengths has shape \(3,\), not \(4,\)"):
        model.encode(src, src_mask, torch.tensor(LENGTHS[:3]))


def test_the_trainer_hands_the_rnn_its_source_lengths_from_the_host(
    compose, small_overrides, tmp_path, monkeypatch
):
    """Every training forward of the RNN gets the lengths counted from the host batch
    before its copy to the device (on a GPU, counting them from the device mask made every
    step wait for the device); validation, which may wait, counts them itself."""
    from transformer.trainer import Trainer

    overrides = [o for o in small_overrides if not o.startswith("model.")]
    cfg = compose([*overrides, "model=rnn", "model.emb_dim=16", "model.hidden_size=16"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.host_lengths
    seen = []
    encode = BahdanauRNN.encode

    def spy(self, src, src_mask, src_lengths=None):
        seen.append((src_lengths, src_mask.sum(dim=1)))
        return encode(self, src, src_mask, src_lengths)

    monkeypatch.setattr(BahdanauRNN, "encode", spy)
    stream = trainer.batches()
    micro = [next(stream)[1] for _ in range(2)]
    assert trainer.train_step(micro) is not None
    assert len(seen) == 2
    for (given, counted), batch in zip(seen, micro):
        assert isinstance(given, OnHost) and given.tensor.device.type == "cpu"
        assert torch.equal(given.tensor, counted)
        assert torch.equal(given.tensor, batch.src_mask.sum(dim=1))


def test_the_source_lengths_stay_on_the_host_when_ddp_moves_the_inputs(
    compose, small_overrides, tmp_path
):
    """DistributedDataParallel on CUDA copies every tensor among a forward's arguments to
    its device before the forward; the lengths the trainer hands the RNN must not go with
    them (the model would copy them back, and wait for the device at every step). DDP's
    own mover is called here with the ``meta`` device standing in for a GPU."""
    from torch.distributed.utils import _to_kwargs  # what DDP's forward calls (private)

    from transformer.trainer import Trainer

    overrides = [o for o in small_overrides if not o.startswith("model.")]
    cfg = compose([*overrides, "model=rnn", "model.emb_dim=16", "model.hidden_size=16"])
    trainer = Trainer(cfg, tmp_path / "run")
    calls = []
    trainer.train_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    stream = trainer.batches()
    assert trainer.train_step([next(stream)[1]]) is not None
    ((args, kwargs),) = calls
    moved_args, moved_kwargs = _to_kwargs(args, kwargs, torch.device("meta"), False)
    assert all(t.device.type == "meta" for t in moved_args[0])  # the batch would move
    lengths = moved_kwargs[0]["src_lengths"]
    assert isinstance(lengths, OnHost) and lengths.tensor.device.type == "cpu"
    # a bare tensor would have moved, as the lengths did before they were held in an OnHost
    assert _to_kwargs((), {"x": lengths.tensor}, torch.device("meta"), False)[1][0]["x"].is_meta
