"""CPU dropout: the cost of a mask, and of dropout's forward + backward, three ways.

    python bench/dropout_masks.py [--reps 20] [--out results/bench/dropout_masks_cpu.md]

On the shapes of the default Transformer's dropout sites (4,096 tokens x 256, the residual
stream, and x 1,024, the feed-forward activations), times

- ``F.dropout``: torch's own, a ``bernoulli_`` mask;
- ``rand >= p``: a float draw per element (``torch.rand_like``) compared with p, the bool mask
  multiplied in (what ``transformer/dropout.py`` did before);
- ours: ``transformer/dropout.py``, four 15-bit integers per 64-bit draw, a float mask.

Each row: milliseconds per call, the median of ``--reps`` calls after one untimed call, for the
mask alone and for forward + backward of ``dropout(x, 0.3)``. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402

from transformer.dropout import dropout, keep_mask  # noqa: E402
from transformer.host_memory import reuse_freed_memory  # noqa: E402
from transformer.settings import cpu_model  # noqa: E402

P = 0.3


def rand_mask(x, p):
    return torch.rand_like(x) >= p


def rand_dropout(x, p):
    return x * rand_mask(x, p) * (1.0 / (1.0 - p))


WAYS = {  # name -> (mask only, forward)
    "F.dropout (bernoulli_)": (lambda x, p: torch.empty_like(x).bernoulli_(1 - p), F.dropout),
    "rand >= p, bool mask": (rand_mask, rand_dropout),
    "ours: 15-bit slices of int64 draws": (keep_mask, dropout),
}


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=arguments.count(1), default=20)
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    reuse = reuse_freed_memory()  # as the trainer on the CPU
    lines = [
        "# CPU dropout masks: torch's, a float draw per element, ours",
        "",
        f"- device: CPU {cpu_model()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}; fp32; p = {P}; "
        f"glibc malloc keeps freed memory (trainer.cpu_malloc_reuse): {reuse}",
        f"- command: `python bench/dropout_masks.py {arguments.given(argv)}`",
        f"- median of {args.reps} calls, ms",
        "",
        "| shape | way | mask ms | ns / element | forward + backward ms |",
        "|---|---|---:|---:|---:|",
    ]
    for shape in [(4096, 256), (4096, 1024)]:
        torch.manual_seed(0)
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        for name, (mask, forward) in WAYS.items():
            m_ms = median_ms(lambda: mask(x.detach(), P), args.reps)  # noqa: B023
            fb_ms = median_ms(
                lambda: forward(x, P).backward(grad),  # noqa: B023
                args.reps,
            )
            lines.append(
                f"| {shape[0]} x {shape[1]} | {name} | {m_ms:.2f} | "
                f"{1e6 * m_ms / x.numel():.2f} | {fb_ms:.2f} |"
            )
            print(lines[-1], flush=True)
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
