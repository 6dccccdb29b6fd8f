"""The host's share of a training step, measured on the CPU: operators dispatched per step,
and the time of a step with little arithmetic.

    python bench/host_overhead.py [--out results/bench/host_overhead_cpu.md]

On an H100 a step of the Multi30k model takes about the same time at 4k and at 25k tokens
(results/bench/train_speed_h100.md): the GPU waits for the host, which issues one kernel
after another, each costing Python, autograd, autocast, dispatch and the launch itself. That
host work does not depend on the model's width nor on the batch, so this measures it where
there is no GPU: for each config's depth and layout (its layers, heads, tied embeddings),
one bf16-autocast training step (forward, label-smoothed loss, backward, clipping, fused
AdamW; as ``bench/train_speed.py``) of

- the operators it dispatches that compute (views and bare allocations left out): on a GPU
  each is at least one kernel launch, the count that profile_step.py reports there; counted
  at the config's real width on a batch of 2 x 5 tokens, and
- the median time of a step at width 32 (d_ff 64, vocabulary 64) on that batch, where the
  arithmetic is small and what is left is mostly the cost of issuing each operator,

for ours and HF Marian of the same layout. When a step is bound by the host, as the Multi30k
model's is on an H100, its time is roughly its operator count times a cost per launch, so
Marian's count over ours is about what ours can gain in eager mode; more needs fewer
launches per step than eager PyTorch makes (CUDA graphs,
``trainer.compile_mode=reduce-overhead``). On the CPU attention with dropout runs PyTorch's
math SDPA (about twenty operators per call, the same for both models), dropout takes three
operators, and a bf16 matrix product costs tens of microseconds even at width 32, so neither
the counts nor the times are the GPU's; the comparison between the models is the point. A
second, GPU-like count leaves attention dropout out, so that SDPA runs its fused CPU kernel
(one operator per call and pass, as the fused kernels on a GPU, which apply the dropout
inside), and sends every other dropout through ``native_dropout`` (one operator each way, as
``F.dropout`` on CUDA). The models' timing alternates in rounds, so
that load drift on the machine hits them alike. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import (  # noqa: E402
    CONFIGS,
    DROPOUT,
    build_model,
    make_step,
)

from transformer import dropout  # noqa: E402
from transformer.settings import cpu_model  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
# Operators that compute nothing: no kernel on a GPU (views are left out by their schema).
NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "_unsafe_view", "lift_fresh"}


class Dispatched(TorchDispatchMode):
    """Counts the computing operators dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_batch(vocab: int):
    """2 sentences of 5 source and 5 target tokens."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, vocab, (2, 5), generator=g)
    tgt = torch.randint(3, vocab, (2, 6), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return types.SimpleNamespace(src=src, src_mask=mask, tgt_in=tgt[:, :-1], tgt_out=tgt[:, 1:])


def build(name: str, cfg: dict, vocab: int, dropout: dict = DROPOUT):
    torch.manual_seed(0)
    return build_model(name, cfg, vocab, PAD, BOS, EOS, dropout)


MODELS = ("ours", "ours/bf16-weights", "marian")
# Without attention dropout SDPA runs its fused CPU kernel, one operator per call forward and
# one backward, as its fused kernels do on a GPU (which apply the dropout inside): a count
# nearer to a GPU's launches than the CPU's math attention with dropout gives.
FUSED_ATTENTION = DROPOUT | {"attn_dropout": 0.0}


def make(name: str, cfg: dict, vocab: int, dropout: dict = DROPOUT):
    """One training step of the model ``name`` (MODELS) at ``cfg``."""
    precision = "bf16-weights" if name == "ours/bf16-weights" else "bf16"
    model = build(name.split("/")[0], cfg, vocab, dropout)
    return make_step(model, PAD, torch.device("cpu"), precision)


@contextlib.contextmanager
def gpu_dropout():
    """Dropout in both models through ``native_dropout``, one operator forward and one
    backward, as ``F.dropout`` dispatches on CUDA (the CPU's takes three operators)."""
    cpu_dropout = F.dropout

    def one_op(x, p=0.5, training=True, inplace=False):
        return torch.native_dropout(x, p, True)[0] if training and p > 0 else x

    F.dropout = one_op
    try:
        yield
    finally:
        F.dropout = cpu_dropout


def total(ops: collections.Counter) -> int:
    return sum(ops.values())


def count_ops(cfg: dict, vocab: int, dropout: dict = DROPOUT) -> dict[str, collections.Counter]:
    counts = {}
    batch = tiny_batch(vocab)
    for name in MODELS:
        step = make(name, cfg, vocab, dropout)
        step(batch)  # the optimizer's state exists from the second step on
        with Dispatched() as seen:
            step(batch)
        counts[name] = seen.ops
    return counts


def time_steps(cfg: dict, rounds: int, steps: int) -> dict[str, float]:
    vocab = 64
    narrow = cfg | {"d_model": 32, "d_ff": 64}
    batch = tiny_batch(vocab)
    runs = {}
    for name in MODELS:
        runs[name] = make(name, narrow, vocab)
        for _ in range(5):
            runs[name](batch)
    times = {name: [] for name in MODELS}
    for _ in range(rounds):
        for name, step in runs.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=arguments.names(CONFIGS), default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=arguments.count(1), default=10)
    ap.add_argument(
        "--steps", type=arguments.count(1), default=20, help="timed steps per model and round"
    )
    ap.add_argument("--top", type=arguments.count(1), default=8, help="operators listed per model")
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    dropout.RAND_MASK_ON_CPU = False  # F.dropout in ours too, as on a GPU (Marian's dropout)
    lines = [
        f"# Host overhead of a training step ({cpu_model()}, {torch.get_num_threads()} threads)",
        "",
        f"- torch {torch.__version__}; bf16 autocast on the CPU; dropout 0.3/0.1/0.1 (torch's "
        "CPU dropout); fused AdamW; label-smoothed CE, not fused with the projection",
        f"- command: `python bench/host_overhead.py {arguments.given(argv)}`",
        "- ops/step: computing operators dispatched in one step (not views or bare "
        "allocations; on a GPU each is a kernel launch at least), at the config's width on a "
        "2 x 5-token batch; casts: those of them that are `aten::_to_copy`",
        "- GPU-like: the same count without attention dropout, so that SDPA runs its fused "
        "CPU kernel (one operator per call and pass, as its fused kernels on a GPU, which "
        "apply the dropout inside) instead of the CPU's math attention (matrix products, "
        "softmax, dropout, casts: the same ~20 operators per call for both models), and with "
        "every other dropout through `native_dropout` (one operator forward and one "
        "backward, as `F.dropout` on CUDA; the CPU's takes three): nearer a GPU's launch "
        "count, still not it (some operators launch several kernels on a GPU, and "
        "`profile_step.py` counts the launches there)",
        f"- ms/step: median over {args.rounds} rounds x {args.steps} steps per model, the "
        "models alternating, of the config's depth at width 32 (d_ff 64, vocabulary 64) on "
        "that batch: mostly the cost of issuing operators, little arithmetic",
        "- ours: as `bench/train_speed.py` eager bf16 on a GPU (output projection not fused "
        "into the loss); ours/bf16-weights: the same with `trainer.precision=bf16-weights` "
        "(the forward and backward on a bf16 copy without autocast, fused AdamW on the fp32 "
        "model; transformer/precision.py); marian: HF MarianMTModel of the same layout",
        "- Marian / this: Marian's ops and ms per step over this model's",
        "",
        "| config | model | ops/step | casts/step | ms/step | Marian / this (ops) "
        "| Marian / this (ms) | ops/step, GPU-like | Marian / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tops = []
    for cname in args.configs:
        cfg = CONFIGS[cname]
        counts = count_ops(cfg, vocab=8000)
        with gpu_dropout():
            fused = count_ops(cfg, 8000, FUSED_ATTENTION)
        fused = {name: total(ops) for name, ops in fused.items()}
        ms = time_steps(cfg, args.rounds, args.steps)
        for name in MODELS:
            ops = counts[name]
            lines.append(
                f"| {cname} | {name} | {total(ops):,} | {ops['_to_copy']:,} | "
                f"{ms[name]:.2f} | {total(counts['marian']) / total(ops):.2f}x | "
                f"{ms['marian'] / ms[name]:.2f}x | {fused[name]:,} | "
                f"{fused['marian'] / fused[name]:.2f}x |"
            )
            print(lines[-1], flush=True)
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
            tops.append(f"- {cname}, {name}: {top}")
        arguments.save(args.out, lines, done=False)
    lines += ["", "Most dispatched operators per step:", "", *tops]
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
