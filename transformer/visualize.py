"""Attention heatmaps of real translations (``translate.py ... attention_plot=DIR``).

What is drawn is the attention the model paid while producing its output: for the
Transformer the cross-attention weights of every decoder layer and head (Vaswani et al.
2017, Section 3.2), for the RNN the alignment a_ij of Bahdanau et al. 2014 (their Figure 3).
Whatever the kind, a row holds the weights its output mixed the values with: for linear
attention, which never forms them to compute, phi(q_i) . phi(k_j) normalised over the row
(its quadratic form, Katharopoulos et al. 2020, eq. 4), not a softmax. The title names the
kind. Rows are output tokens (the row of token t holds the weights of the step that
produced it, the last row those of the step that produced EOS), columns are source subwords.

The Transformer's self-attention is drawn too, one picture of all heads per layer: the
encoder's (source subwords on both axes) and the decoder's causal one (rows the output
tokens as above, columns the decoder's inputs, BOS and the output so far), so that a local
window or a sparse pattern shows as the model applied it.

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

ROLES = ("cross", "encoder", "decoder")  # the Transformer's attention, by role
SELF_TITLES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention"}


@torch.no_grad()
def attention_maps(model, src, src_mask, tgt_in) -> dict[str, torch.Tensor]:
    """Teacher-forced attention weights by role, each (B, L, h, T_query, T_key): ``cross``
    (B, L, h, T, S) for both models (the RNN's alignment with L = h = 1); for the
    Transformer also ``encoder`` (B, L, h, S, S) and ``decoder`` (B, L, h, T, T), L its
    layers, h its heads. One forward pass. Call with the model in eval.

    :param src: (B, S) ids  :param src_mask: (B, S) bool  :param tgt_in: (B, T) BOS + y
    """
    if not hasattr(model, "attention_modules"):  # the RNN exposes its alignment
        return {"cross": model.attention_weights(src, src_mask, tgt_in)[:, None, None]}
    modules = {role: model.attention_modules(role) for role in ROLES}
    every = [m for role in ROLES for m in modules[role]]
    for m in every:
        m.need_weights = True
    try:
        model(src, src_mask, tgt_in)
        return {role: torch.stack([m.last_weights for m in modules[role]], dim=1) for role in ROLES}
    finally:
        for m in every:
            m.need_weights, m.last_weights = False, None


def cross_attention(model, src, src_mask, tgt_in) -> torch.Tensor:
    """The attention over the source, (B, L, h, T, S), of ``attention_maps``."""
    return attention_maps(model, src, src_mask, tgt_in)["cross"]


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


def save_self_attention(directory, role: str, weights, key_labels, query_labels, kind=None):
    """The self-attention of one ``role`` (``encoder`` or ``decoder``), weights (L, h, T_q,
    T_k), into ``directory``: ``{role}_layer{l}_heads.png``, all heads of layer l in one
    picture, titled with the role and its ``kind``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights.float().cpu().numpy()
    title = SELF_TITLES[role] + (f" ({kind})" if kind else "")
    return [
        save_overview(
            directory / f"{role}_layer{layer}_heads.png",
            weights[layer],
            key_labels,
            query_labels,
            f"{title}, layer {layer}, all {weights.shape[1]} heads",
        )
        for layer in range(weights.shape[0])
    ]


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
        maps = attention_maps(model, src_t, torch.ones_like(src_t, dtype=torch.bool), tgt_in)
        directory = Path(out_dir) / f"{start + i:04d}"
        src_labels = src_tok.pieces(src)
        tgt_labels = tgt_tok.pieces([*out, tgt_tok.eos_id])
        save_sentence(directory, maps["cross"][0], src_labels, tgt_labels, label)
        options = getattr(model, "attention_options", None)
        if "encoder" in maps:
            kind = getattr(options, "encoder", None)
            save_self_attention(directory, "encoder", maps["encoder"][0], src_labels, src_labels,
                                kind)  # fmt: skip
        if "decoder" in maps:  # columns: the decoder's inputs, BOS and the output so far
            in_labels = tgt_tok.pieces(tgt_in[0].tolist())
            kind = getattr(options, "decoder", None)
            save_self_attention(directory, "decoder", maps["decoder"][0], in_labels, tgt_labels,
                                kind)  # fmt: skip
        text = f"source: {src_tok.decode([src])[0]}\noutput: {tgt_tok.decode([out])[0]}\n"
        (directory / "sentence.txt").write_text(text, encoding="utf-8")
        written.append(directory)
    return written


if __name__ == "__main__":  # the pictures are made while translating
    import sys

    sys.exit(
        "transformer.visualize is a library: draw attention with translate.py, e.g.\n"
        "  echo 'Ein Hund läuft.' | python translate.py ckpt=RUN attention_plot=pics"
    )
