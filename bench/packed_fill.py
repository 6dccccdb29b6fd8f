"""Packed rows on Multi30k batches: how full the rows are, and what packing costs the host.

    python bench/packed_fill.py [--max-tokens 4096,25000] [--widths 64,128,256] [--batches 40]
        [--open-rows 1,4,0] [--join 1] [--out results/bench/NAME.md]

``trainer.packed_rows=W`` (transformer/packing.py) lays a batch's sentence pairs out several
to a row of W slots a side. Every token-wise part of a step (embeddings, projections, FFNs,
norms, the loss) then computes on R x W slots instead of B x S and B x T padded positions,
and attention on whole rows. For the first batches of epoch 0 as the trainer cuts them
(length-bucketed), this reports the share of positions that hold tokens, padded and packed,
the rows against the pairs, and the host time of ``pack_batch`` per batch (the trainer packs
in its main thread, while the device runs the previous step), for pairs that may join only
the last row started, the last ``OPEN_ROWS`` (4, the trainer's), or any. With ``--join K``,
on the training pairs joined K at a time (``bench/train_speed.py``: sentences like WMT's).
The header gives the training pairs' ``mean_pair_len``, which ``trainer.packed_rows=auto``
weighs. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import (  # noqa: E402
    add_join_option,
    batches_said,
    load_checked,
    machine,
    training_pairs,
)

from transformer.packing import OPEN_ROWS, mean_pair_len, pack_batch  # noqa: E402


def real_share(batches, pad: int) -> float:
    """Tokens over positions (source and target together) of the batches."""
    tokens = sum(int((b.src != pad).sum() + (b.tgt_out != pad).sum()) for b in batches)
    return tokens / sum(b.src.numel() + b.tgt_out.numel() for b in batches)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=arguments.counts(1), default="4096,25000")
    ap.add_argument("--widths", type=arguments.counts(1), default="64,128,256")
    ap.add_argument(
        "--batches", type=arguments.count(1), default=40, help="the first N batches of epoch 0"
    )
    ap.add_argument(
        "--repeats", type=arguments.count(1), default=5, help="timed packings of each batch"
    )
    ap.add_argument(
        "--open-rows",
        type=arguments.counts(0),
        default=f"1,{OPEN_ROWS},0",
        help="the rows a pair may join: the last N started (0: any)",
    )
    add_join_option(ap)
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    widths, open_rows = args.widths, args.open_rows
    for max_tokens in args.max_tokens:  # a budget below the longest example: before timing
        load_checked(ap, max_tokens, 0, args.join)
    train, _ = training_pairs(args.join)
    lines = [
        f"# Packed rows on Multi30k batches ({machine(torch.device('cpu'))})",
        "",
        f"- torch {torch.__version__}; the first {args.batches} training batches of epoch 0: "
        f"{batches_said(args.join)}, as the trainer cuts them",
        f"- the training pairs' mean_pair_len (transformer/packing.py: the longer side plus its "
        f"end token, what trainer.packed_rows=auto weighs): "
        f"{mean_pair_len(train.src_lens, train.tgt_lens):.1f} slots",
        f"- command: `python bench/packed_fill.py {arguments.given(argv)}`",
        "- real: tokens over positions, sources and targets together; host ms: "
        f"`pack_batch` per batch, median of {args.repeats} x the batches",
        "",
        "| max tokens | layout | open rows | rows (mean) | pairs per row | real | "
        "host ms per batch |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for max_tokens in args.max_tokens:
        batches, tok = load_checked(ap, max_tokens, args.batches, args.join)
        pad = tok.pad_id
        pairs = statistics.mean(len(b.src) for b in batches)
        lines.append(
            f"| {max_tokens} | padded | - | {pairs:,.0f} | 1 | "
            f"{100 * real_share(batches, pad):.1f}% | - |"
        )
        for width in widths:
            for n in open_rows:
                n_open = n or len(batches[0].src) * 10  # 0: more rows than any batch has
                times = []
                for _ in range(args.repeats):
                    for b in batches:
                        t0 = time.perf_counter()
                        pack_batch(b, pad, width, n_open)
                        times.append(time.perf_counter() - t0)
                packed = [pack_batch(b, pad, width, n_open) for b in batches]
                rows = statistics.mean(len(p.src) for p in packed)
                lines.append(
                    f"| {max_tokens} | rows of {width} | {n or 'all'} | {rows:,.0f} | "
                    f"{pairs / rows:.1f} | {100 * real_share(packed, pad):.1f}% | "
                    f"{1000 * statistics.median(times):.2f} |"
                )
        print("\n".join(lines[-len(widths) * len(open_rows) - 1 :]), flush=True)
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
