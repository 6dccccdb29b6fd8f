"""Attention pictures (visualize.py): the plotted weights are the ones the search used."""

import sys

import matplotlib.image
import pytest
import torch

from transformer import translate_cli, visualize
from transformer.rnn_model import BahdanauRNN
from transformer.search import beam_search
from transformer.seq2seq import DecoderState, EncoderOut
from transformer.tokenizer import train_or_load
from transformer.transformer_model import Transformer
from transformer.visualize import cross_attention, plot_translations

PAD, BOS, EOS, V = 0, 2, 3, 40


def make(name, n_heads=4):
    torch.manual_seed(0)
    if name == "rnn":
        return BahdanauRNN(V, V, PAD, emb_dim=16, hidden_size=24).eval()
    att = {"kind": "scaled_dot", "cross": name, "window": 3, "stride": 4}
    return Transformer(
        V,
        V,
        PAD,
        d_model=32,
        n_heads=n_heads,
        d_ff=64,
        n_enc_layers=1,
        n_dec_layers=2,
        attention=att,
    ).eval()


def sources():
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, V, (3, 9), generator=g)
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    return src, src != PAD


def step_weights(model, state: DecoderState) -> torch.Tensor:
    """The attention of the step just taken, (N, L, h, S)."""
    if isinstance(model, BahdanauRNN):
        return state.tensors["attn"][:, None, None]  # (N, S) -> (N, 1, 1, S)
    return torch.stack([m.last_weights[:, :, 0] for m in model.cross_attention_modules()], 1)


class Recorder:
    """The Seq2Seq contract around ``model``; every decode step records, for each row, its
    sentence, its prefix and the attention weights it used (what beam search saw)."""

    def __init__(self, model):
        self.model, self.seen = model, {}
        for m in getattr(model, "cross_attention_modules", list)():
            m.need_weights = True

    def encode(self, src, src_mask):
        enc = self.model.encode(src, src_mask)
        sent = torch.arange(src.shape[0])  # follows enc.reorder through the beams
        return EncoderOut(enc.memory, enc.src_mask, {**enc.extra, "sent": sent})

    def init_state(self, enc):
        inner = self.model.init_state(enc)
        prefix = torch.empty(enc.memory.shape[0], 0, dtype=torch.long)
        return DecoderState({"inner": inner.tensors, "prefix": prefix}, inner.step)

    def decode_step(self, prev, enc, state):
        prefix = torch.cat([state.tensors["prefix"], prev[:, None]], 1)  # (N, t + 1)
        inner = DecoderState(state.tensors["inner"], state.step)
        logits, inner = self.model.decode_step(prev, enc, inner)
        for row, w in enumerate(step_weights(self.model, inner)):
            self.seen[int(enc.extra["sent"][row]), tuple(prefix[row].tolist())] = w
        return logits, DecoderState({"inner": inner.tensors, "prefix": prefix}, inner.step)


MODELS = ["scaled_dot", "additive", "linear", "rnn"]


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_weights_equal_incremental_decoding(name):
    model = make(name)
    src, src_mask = sources()
    tgt_in = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(1))
    tgt_in[:, 0] = BOS
    replay = cross_attention(model, src, src_mask, tgt_in)  # (B, L, h, T, S)
    for m in getattr(model, "cross_attention_modules", list)():
        m.need_weights = True
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    for t in range(tgt_in.shape[1]):
        _, state = model.decode_step(tgt_in[:, t], enc, state)
        torch.testing.assert_close(
            step_weights(model, state), replay[:, :, :, t], atol=1e-5, rtol=0
        )
    torch.testing.assert_close(replay.sum(-1), torch.ones(replay.shape[:-1]))
    assert torch.all(replay[2, ..., 3:] == 0)  # padded source positions


@pytest.mark.parametrize("name", MODELS)
def test_plotted_weights_are_those_beam_search_used(name):
    model = make(name)
    rec = Recorder(model)
    src, src_mask = sources()
    best = beam_search(rec, src, src_mask, BOS, EOS, beam_size=3, max_len_a=0.0, max_len_b=6)
    for b, hyps in enumerate(best):
        n = int(src_mask[b].sum())
        tokens = [BOS, *hyps[0].tokens]
        replay = cross_attention(
            model, src[b : b + 1, :n], src_mask[b : b + 1, :n], torch.tensor([tokens])
        )[0]  # (L, h, T, n) of the chosen hypothesis alone, unpadded
        for t in range(len(tokens)):
            seen = rec.seen[b, tuple(tokens[: t + 1])]  # (L, h, S) during the search
            assert torch.all(seen[..., n:] == 0)
            torch.testing.assert_close(seen[..., :n], replay[:, :, t], atol=1e-5, rtol=0)


class TinyTok:
    """Stands in for a Tokenizer: ids print as themselves."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def pieces(self, ids):
        return [f"w{i}" for i in ids]

    def decode(self, seqs):
        return [" ".join(self.pieces(s)) for s in seqs]


def test_plot_files_per_layer_head_overview_and_rnn_alignment(tmp_path):
    tok = TinyTok()
    src_ids = [[5, 6, 7, EOS], [], [9, 10, EOS]]
    outputs = [[11, 12], None, [13]]
    dirs = plot_translations(make("scaled_dot", 2), src_ids, outputs, tok, tok, tmp_path / "tf")
    assert [d.name for d in dirs] == ["0000", "0002"]
    names = sorted(p.name for p in dirs[0].iterdir())
    heads = [f"layer{layer}_head{h}.png" for layer in range(2) for h in range(2)]
    overviews = ["layer0_heads.png", "layer1_heads.png", "encoder_layer0_heads.png"]
    overviews += ["decoder_layer0_heads.png", "decoder_layer1_heads.png"]  # 1 + 2 layers
    assert names == sorted(heads + overviews + ["sentence.txt"])
    image = matplotlib.image.imread(dirs[0] / "layer1_heads.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.05
    assert "w11 w12" in (dirs[0] / "sentence.txt").read_text()
    rnn = plot_translations(make("rnn"), src_ids, outputs, tok, tok, tmp_path / "rnn", start=7)
    assert [d.name for d in rnn] == ["0007", "0009"]
    assert sorted(p.name for p in rnn[0].iterdir()) == ["alignment.png", "sentence.txt"]


def test_one_head_one_layer_transformer_is_drawn_as_cross_attention(tmp_path, monkeypatch):
    """A single matrix was taken for the RNN's: alignment.png, titled "alignment"."""
    titles, draw = [], visualize._draw

    def spy(ax, weights, src_labels, tgt_labels, title, small=False):
        titles.append(title)
        return draw(ax, weights, src_labels, tgt_labels, title, small)

    monkeypatch.setattr(visualize, "_draw", spy)
    torch.manual_seed(0)
    model = Transformer(V, V, PAD, d_model=16, n_heads=1, d_ff=32, n_enc_layers=1,
                        n_dec_layers=1, attention={"cross": "linear"}).eval()  # fmt: skip
    tok = TinyTok()
    (out,) = plot_translations(model, [[5, 6, EOS]], [[7]], tok, tok, tmp_path)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["decoder_layer0_heads.png", "encoder_layer0_heads.png", "layer0_head0.png",
                     "layer0_heads.png", "sentence.txt"]  # fmt: skip
    assert titles[0] == "cross-attention (linear), layer 0, head 0"


def test_each_picture_draws_its_own_layer_and_head(tmp_path, monkeypatch):
    """Every heatmap shows its layer's and head's weights, output tokens as rows and source
    tokens as columns: the image each one draws, read back from matplotlib. (The other
    tests check files and pixels; a transposed matrix or every head drawing head 0 passed.)"""
    drawn, draw = [], visualize._draw

    def spy(ax, weights, src_labels, tgt_labels, title, small=False):
        im = draw(ax, weights, src_labels, tgt_labels, title, small)
        drawn.append((title, im.get_array().data.copy(), list(src_labels), list(tgt_labels)))
        return im

    monkeypatch.setattr(visualize, "_draw", spy)
    weights = torch.rand(2, 3, 2, 4, generator=torch.Generator().manual_seed(0))  # L h T S
    src, tgt = ["a", "b", "c", "</s>"], ["x", "</s>"]
    visualize.save_sentence(tmp_path, weights, src, tgt)
    expected = {}
    for layer in range(2):
        for head in range(3):
            expected[f"cross-attention, layer {layer}, head {head}"] = weights[layer, head]
    overview = [w for layer in weights for w in layer]  # "head i" of layer 0, then layer 1
    assert len(drawn) == 12 and [t for t, *_ in drawn].count("head 0") == 2
    for title, image, src_labels, tgt_labels in drawn:
        want = expected[title] if title in expected else overview.pop(0)
        assert image.shape == (len(tgt_labels), len(src_labels)) == (2, 4)
        torch.testing.assert_close(torch.from_numpy(image), want)
        assert (src_labels, tgt_labels) == (src, tgt)
    assert not overview


def test_self_attention_pictures_show_the_pattern_the_model_applied(tmp_path, monkeypatch):
    """The encoder's local window and the decoder's causal mask, as drawn: each layer's
    picture holds that layer's weights (equal to a teacher-forced pass of its own), zero
    outside the window or above the diagonal, source pieces on both axes of the encoder's,
    the decoder's inputs (BOS + output) as its columns."""
    drawn, draw = {}, visualize._draw

    def spy(ax, weights, src_labels, tgt_labels, title, small=False):
        drawn.setdefault(ax.figure, []).append((weights, list(src_labels), list(tgt_labels)))
        return draw(ax, weights, src_labels, tgt_labels, title, small)

    monkeypatch.setattr(visualize, "_draw", spy)
    suptitles, save = [], visualize.save_overview

    def named(path, weights, src_labels, tgt_labels, title):
        suptitles.append((path.name, title, weights))
        return save(path, weights, src_labels, tgt_labels, title)

    monkeypatch.setattr(visualize, "save_overview", named)
    torch.manual_seed(0)
    local = {"encoder": "local", "window": 1}
    model = Transformer(V, V, PAD, d_model=32, n_heads=2, d_ff=64, n_enc_layers=2,
                        n_dec_layers=2, attention=local).eval()  # fmt: skip
    tok, src, out = TinyTok(), [5, 6, 7, 8, 9, EOS], [11, 12, 13]
    plot_translations(model, [src], [out], tok, tok, tmp_path)
    src_t, tgt_in = torch.tensor([src]), torch.tensor([[BOS, *out]])
    maps = visualize.attention_maps(model, src_t, torch.ones_like(src_t, dtype=torch.bool), tgt_in)
    pictures = {name: (title, w) for name, title, w in suptitles}
    S, T = len(src), len(out) + 1
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    for layer in range(2):
        title, w = pictures[f"encoder_layer{layer}_heads.png"]
        assert title == f"encoder self-attention (local), layer {layer}, all 2 heads"
        torch.testing.assert_close(torch.from_numpy(w), maps["encoder"][0, layer].float())
        assert w.shape == (2, S, S) and (w[:, (i - j).abs() > 1] == 0).all()
        torch.testing.assert_close(torch.from_numpy(w.sum(-1)), torch.ones(2, S))
        title, w = pictures[f"decoder_layer{layer}_heads.png"]
        assert title == f"decoder self-attention (scaled_dot), layer {layer}, all 2 heads"
        torch.testing.assert_close(torch.from_numpy(w), maps["decoder"][0, layer].float())
        assert w.shape == (2, T, T) and (w[:, torch.ones(T, T).triu(1).bool()] == 0).all()
        assert w[:, -1, 0].min() > 0  # the last step sees BOS, not only itself
    heatmaps = [cells for cells in drawn.values() if cells[0][0].shape == (S, S)]
    assert len(heatmaps) == 2
    assert all(c[1] == c[2] == tok.pieces(src) for h in heatmaps for c in h)
    decoder = [cells for cells in drawn.values() if cells[0][0].shape == (T, T)]
    assert len(decoder) == 2
    inputs, outputs = tok.pieces([BOS, *out]), tok.pieces([*out, EOS])
    assert all(c[1] == inputs and c[2] == outputs for h in decoder for c in h)


@pytest.fixture()
def cli_model(corpus_root, tmp_path, monkeypatch):
    """translate.py's checkpoint replaced by a small random Transformer; its tokenizer."""
    lines = (corpus_root / "multi30k" / "train.de").read_text("utf-8").splitlines()
    tok = train_or_load(lines, tmp_path / "spm", vocab_size=200)
    torch.manual_seed(0)
    model = Transformer(
        len(tok), len(tok), tok.pad_id, d_model=16, n_heads=2, d_ff=32, n_dec_layers=1
    ).eval()
    monkeypatch.setattr(
        translate_cli,
        "load_for_inference",
        lambda ckpt, device: (model, tok, tok, {"data": {"max_len": 50}}),
    )
    return tok


def test_translate_cli_writes_plots(compose, cli_model, tmp_path):
    (tmp_path / "in.txt").write_text("Ein Hund.\n\nZwei Kinder spielen.\n", "utf-8")
    cfg = compose(
        [
            "ckpt=unused.pt",
            f"input={tmp_path / 'in.txt'}",
            f"output={tmp_path / 'out.txt'}",
            f"attention_plot={tmp_path / 'plots'}",
            "device=cpu",
            "decode.beam_size=2",
            "decode.max_len_a=0",
            "decode.max_len_b=5",
        ],
        name="translate",
    )
    best = translate_cli.translate(cfg)
    assert len(best) == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["0000", "0002"]
    assert (tmp_path / "plots" / "0002" / "layer0_heads.png").is_file()


def test_interactive_plots_number_the_inputs_across_prompts(
    compose, cli_model, tmp_path, monkeypatch, typed
):
    """Each prompt's sentence gets the next folder; a picture's rows are the output tokens
    and EOS, its columns the source tokens."""
    typed("Ein Hund.", "Zwei Kinder spielen.")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    shapes = []
    save = visualize.save_sentence

    def spy(directory, weights, src_labels, tgt_labels, label):
        shapes.append((tuple(weights.shape[-2:]), len(tgt_labels), len(src_labels)))
        assert tgt_labels[-1] == cli_model.sp.id_to_piece(cli_model.eos_id)
        return save(directory, weights, src_labels, tgt_labels, label)

    monkeypatch.setattr(visualize, "save_sentence", spy)
    overrides = ["ckpt=unused.pt", f"attention_plot={tmp_path / 'plots'}", "device=cpu"]
    cfg = compose([*overrides, "decode.max_len_a=0", "decode.max_len_b=5"], name="translate")
    assert len(translate_cli.translate(cfg)) == 2
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["0000", "0001"]
    assert len(shapes) == 2 and all(w == (t, s) for w, t, s in shapes)
