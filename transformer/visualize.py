"""Attention heatmaps of real translations (``translate.py ... attention_plot=DIR``).

What is drawn is the attention the model paid while producing its output: for the
Transformer the cross-attention weights of every decoder layer and head (Vaswani et al.
2017, Section 3.2), for the RNN the alignment a_ij of Bahdanau et al. 2014 (their Figure 3).
Whatever the kind, a row holds the weights its output mixed the values with: for linear
attention, which never forms them to compute, phi(q_i) . phi(k_j) normalised over the row
(its quadratic form, Katharopoulos et al. 2020, eq. 4), not a softmax. The title names the
kind. Only cross-attention is drawn: a local or sparse self-attention pattern is not.
Rows are output tokens (the row of token t holds the weights of the step that produced it,
the last row those of the step that produced EOS), columns are source subwords.

The weights are recorded by re-running the decoder teacher-forced on BOS + the produced
output (for beam search: the chosen hypothesis) with weights kept. A step of incremental
decoding sees exactly that prefix, so the weights are those of the search itself;
tests/test_visualize.py checks it, beam search included. Matplotlib draws on its Agg canvas
(no display, no global backend switch).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@torch.no_grad()
def cross_attention(model, src, src_mask, tgt_in) -> torch.Tensor:
    """Teacher-forced attention over the source, (B, L, h, T, S): L decoder layers and h heads
    for the Transformer, L = h = 1 (the alignment) for the RNN. Call with the model in eval.

    :param src: (B, S) ids  :param src_mask: (B, S) bool  :param tgt_in: (B, T) BOS + y
    """
    if not hasattr(model, "cross_attention_modules"):  # the RNN exposes its alignment
        return model.attention_weights(src, src_mask, tgt_in)[:, None, None]  # (B, 1, 1, T, S)
    modules = model.cross_attention_modules()
    for m in modules:
        m.need_weights = True
    try:
        model(src, src_mask, tgt_in)
        weights = [m.last_weights for m in modules]  # L x (B, h, T, S)
    finally:
        for m in modules:
            m.need_weights, m.last_weights = False, None
    return torch.stack(weights, dim=1)  # (B, L, h, T, S)


def _draw(ax, weights, src_labels, tgt_labels, title, small=False):
    """One heatmap: weights (T, S) with target rows and source columns."""
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    size = 6 if small else 8
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=size)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels, fontsize=size)
    ax.set_title(title, fontsize=size + 2)
    return im


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_heatmap(path, weights, src_labels, tgt_labels, title: str) -> Path:
    """One (T, S) matrix as a PNG with a colour bar; source on x, output on y."""
    T, S = weights.shape
    fig = _figure(min(2.5 + 0.3 * S, 30), min(1.5 + 0.3 * T, 30))
    ax = fig.add_subplot()
    im = _draw(ax, weights, src_labels, tgt_labels, title)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)
    return Path(path)


def save_overview(path, weights, src_labels, tgt_labels, title: str) -> Path:
    """All heads of one layer, weights (h, T, S), in one picture (a grid of at most 4 columns)."""
    h, T, S = weights.shape
    cols = min(4, math.ceil(math.sqrt(h)))  # 4 heads: 2 x 2, 8: 3 x 3, 16: 4 x 4
    rows = math.ceil(h / cols)
    fig = _figure(min(cols * (1.5 + 0.22 * S), 40), min(rows * (1.2 + 0.22 * T), 40))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.set_axis_off()
            continue
        im = _draw(ax, weights[i], src_labels, tgt_labels, f"head {i}", small=True)
    fig.suptitle(title)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(path, dpi=100)
    return Path(path)


def save_sentence(
    directory, weights, src_labels, tgt_labels, label: str | None = "cross-attention"
) -> list[Path]:
    """The pictures of one sentence, weights (L, h, T, S), into ``directory``:
    ``layer{l}_head{i}.png`` for every layer and head plus ``layer{l}_heads.png``, all heads
    of layer l in one picture, titled with ``label``; ``label=None``: the RNN's alignment,
    one matrix, ``alignment.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights.float().cpu().numpy()
    L, h = weights.shape[:2]
    if label is None:
        path = directory / "alignment.png"
        return [save_heatmap(path, weights[0, 0], src_labels, tgt_labels, "alignment (attention)")]
    paths = []
    for layer in range(L):
        for head in range(h):
            paths.append(
                save_heatmap(
                    directory / f"layer{layer}_head{head}.png",
                    weights[layer, head],
                    src_labels,
                    tgt_labels,
                    f"{label}, layer {layer}, head {head}",
                )
            )
        paths.append(
            save_overview(
                directory / f"layer{layer}_heads.png",
                weights[layer],
                src_labels,
                tgt_labels,
                f"{label}, layer {layer}, all {h} heads",
            )
        )
    return paths


def picture_label(model) -> str | None:
    """The title of ``model``'s pictures: its cross-attention and kind (a Transformer with
    one layer and one head has one matrix too, and is no alignment), or None for the RNN's
    alignment."""
    if not hasattr(model, "cross_attention_modules"):
        return None
    options = getattr(model, "attention_options", None)
    return "cross-attention" + (f" ({options.cross})" if options is not None else "")


def plot_translations(model, src_ids, outputs, src_tok, tgt_tok, out_dir, start: int = 0):
    """Pictures for every translated sentence into ``out_dir/{index:04d}/``.

    :param src_ids: per input, the source ids fed to the model (EOS included); empty = skipped
    :param outputs: per input, the produced tokens (without BOS/EOS), or None
    :param start: index of the first input (interactive use numbers across calls)
    :return: the directories written
    """
    device = next(model.parameters()).device
    label, written = picture_label(model), []
    for i, (src, out) in enumerate(zip(src_ids, outputs)):
        if not src or out is None:
            continue
        tgt_in = torch.tensor([[tgt_tok.bos_id, *out]], device=device)  # (1, T)
        src_t = torch.tensor([src], device=device)  # (1, S)
        weights = cross_attention(model, src_t, torch.ones_like(src_t, dtype=torch.bool), tgt_in)
        directory = Path(out_dir) / f"{start + i:04d}"
        src_labels = src_tok.pieces(src)
        tgt_labels = tgt_tok.pieces([*out, tgt_tok.eos_id])
        save_sentence(directory, weights[0], src_labels, tgt_labels, label)
        text = f"source: {src_tok.decode([src])[0]}\noutput: {tgt_tok.decode([out])[0]}\n"
        (directory / "sentence.txt").write_text(text, encoding="utf-8")
        written.append(directory)
    return written
