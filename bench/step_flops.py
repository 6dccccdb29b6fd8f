"""Model FLOPs of a training step on the batches bench/train_speed.py times, and the step
time a given MFU needs. Analytic: no device, no model.

    python bench/step_flops.py [--configs transformer-base] [--max-tokens 4096,8192,25000]
        [--warmup 3] [--steps 20] [--mfu 0.35] [--join 1] [--out results/bench/step_flops.md]

The batches are ``train_speed.load_batches``' (the first ``--warmup`` are its warm-up, the
next ``--steps`` the timed ones). FLOPs are ``train_speed.flops_by_part`` (matrix products,
forward x 3): on the padded batch shapes, as the kernels compute them, and on the pairs at
their own lengths (``real_flops_by_part``), which MFU counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import (  # noqa: E402
    CONFIGS,
    PEAK_BF16,
    add_join_option,
    batches_said,
    flops_by_part,
    load_checked,
    real_flops_by_part,
)


def mean(xs) -> float:
    return sum(xs) / len(xs)


def summary(cfg: dict, batches, pad: int, vocab: int) -> dict[str, float]:
    """Per timed step on average: sentences, source tokens per padded row and per sentence,
    and TFLOP (padded shapes: linear, attention; the pairs' own lengths: linear, attention)."""
    padded = [flops_by_part(cfg, *b.src.shape, b.tgt_in.shape[1], vocab) for b in batches]
    real = [real_flops_by_part(cfg, b, pad, vocab) for b in batches]
    return {
        "sentences": mean([b.src.shape[0] for b in batches]),
        "src_padded": mean([b.src.shape[1] for b in batches]),
        "src_real": mean([float(b.src_mask.sum(1).float().mean()) for b in batches]),
        **{f"padded_{k}": mean([p[k] for p in padded]) / 1e12 for k in ("linear", "attention")},
        **{f"real_{k}": mean([r[k] for r in real]) / 1e12 for k in ("linear", "attention")},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=arguments.names(CONFIGS), default="transformer-base")
    ap.add_argument("--max-tokens", type=arguments.counts(1), default="4096,8192,25000")
    ap.add_argument("--warmup", type=arguments.count(0), default=3)
    ap.add_argument("--steps", type=arguments.count(1), default=20)
    ap.add_argument("--mfu", type=arguments.number(0, 1), default=0.35, help="in (0, 1]")
    add_join_option(ap)
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    for max_tokens in args.max_tokens:  # a budget below the longest example: a usage error
        load_checked(ap, max_tokens, 0, args.join)
    peak = PEAK_BF16["H100"]
    lines = [
        "# Model FLOPs of a training step on the benchmark's batches",
        "",
        f"- command: `python bench/step_flops.py {arguments.given(argv)}`",
        f"- batches: `bench/train_speed.py`'s ({batches_said(args.join)}; epoch 0, seed 1), "
        f"up to {args.steps} after its {args.warmup} "
        "warm-up batches (as many as epoch 0 has: the timed steps); averages per step",
        "- TFLOP: matrix products, forward x 3 (`train_speed.flops_by_part`), on the padded "
        "batch shapes and on the sentence pairs at their own lengths (what MFU counts)",
        f"- step for {100 * args.mfu:.0f}% MFU: the longest step that reaches it at "
        f"{peak / 1e12:.0f} TFLOP/s (dense bf16, H100/H200 SXM): on the pairs' own FLOPs, and "
        "on the padded shapes' (MFU (padded))",
        "",
        "| config | max tokens | timed steps | sentences | src tokens per row, padded | "
        "per sentence | TFLOP padded: weights | attention | TFLOP own lengths: weights | "
        "attention | "
        f"step ms for {100 * args.mfu:.0f}% MFU | (padded) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cname in args.configs:
        cfg = CONFIGS[cname]
        for max_tokens in args.max_tokens:
            batches, tok = load_checked(ap, max_tokens, args.warmup + args.steps, args.join)
            timed = batches[args.warmup :]  # fewer than --steps where an epoch has fewer
            s = summary(cfg, timed, tok.pad_id, len(tok))
            real = s["real_linear"] + s["real_attention"]
            padded = s["padded_linear"] + s["padded_attention"]
            ms = [1e3 * tflop * 1e12 / (args.mfu * peak) for tflop in (real, padded)]
            lines.append(
                f"| {cname} | {max_tokens} | {len(timed)} | {s['sentences']:,.0f} | "
                f"{s['src_padded']:.1f} | "
                f"{s['src_real']:.1f} | {s['padded_linear']:.3f} | {s['padded_attention']:.4f} | "
                f"{s['real_linear']:.3f} | {s['real_attention']:.4f} | {ms[0]:.1f} | "
                f"{ms[1]:.1f} |"
            )
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
