"""Host time of making a training batch from the encoded Multi30k cache, per batch.

    python bench/collate_time.py [--out results/bench/collate_time_cpu.md]

The trainer makes each batch in its main thread, between steps (``TokenBatcher.batch``:
``transformer.data.collate``), so on a GPU whose step waits for the host this time adds to
every step. This times ``collate`` (on this cache, whose 29 Arrow chunks each hold many of
a batch's examples, the ids are gathered with one numpy indexing per chunk; padded with
boolean masks) against the same batches made one example at a time in Python (how collate
worked before; kept here as the reference, and checked equal), on the training batches of
epoch 0 at several token budgets, the two ways alternating by round.
Not a test: it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import machine  # noqa: E402

from transformer.data import DataError, TokenBatcher, collate  # noqa: E402
from transformer.seq2seq import Batch  # noqa: E402


def one_by_one(split, idx, pad_id, bos_id, eos_id) -> Batch:
    """The batch written one example at a time, each a slice of its Arrow chunk."""
    src, tgt = split.rows(idx)
    B, S, T = len(idx), max(len(s) for s in src) + 1, max(len(t) for t in tgt) + 1
    src_arr = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), pad_id, dtype=np.int64)
    for b, (s, t) in enumerate(zip(src, tgt)):
        src_arr[b, : len(s)], src_arr[b, len(s)] = s, eos_id
        tgt_in[b, 0], tgt_in[b, 1 : len(t) + 1] = bos_id, t
        tgt_out[b, : len(t)], tgt_out[b, len(t)] = t, eos_id
    src_t = torch.from_numpy(src_arr)
    return Batch(src_t, src_t != pad_id, torch.from_numpy(tgt_in), torch.from_numpy(tgt_out))


def load_split():
    from hydra import compose, initialize_config_dir

    from transformer.run_data import prepare_data

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf):
        cfg = compose("train", overrides=["run_dir=/tmp/bench-run", "data.test_splits=[]"])
    splits, _, tok, _ = prepare_data(cfg, Path("/tmp/bench-run"))
    return splits["train"], (tok.pad_id, tok.bos_id, tok.eos_id)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=arguments.count(1), nargs="+", default=[4096, 8192, 25000])
    ap.add_argument("--rounds", type=arguments.count(1), default=5)
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    split, specials = load_split()
    batchers = {}
    for max_tokens in args.max_tokens:  # a budget below the longest example: before timing
        try:
            batchers[max_tokens] = TokenBatcher(
                split, max_tokens, 1, specials, budget="--max-tokens"
            )
        except DataError as e:
            ap.error(str(e))
    ways = {"collate": collate, "one example at a time": one_by_one}
    lines = [
        f"# Host time of making a training batch ({machine(torch.device('cpu'))})",
        "",
        f"- torch {torch.__version__}, numpy {np.__version__}; command: "
        f"`python bench/collate_time.py {arguments.given(argv)}`",
        f"- Multi30k de->en training split from the encoded cache "
        f"({split.table['src_ids'].num_chunks} Arrow chunks, {len(split):,} examples); the "
        "batches of epoch 0 (seed 1) at each token budget, every one made each round",
        f"- ms per batch: median over {args.rounds} rounds x every batch, the ways "
        "alternating by round; both ways give equal batches (checked on every batch)",
        "",
        "| max tokens | batches | examples per batch (median) | way | ms per batch |",
        "|---:|---:|---:|---|---:|",
    ]
    for max_tokens, batcher in batchers.items():
        plan = batcher.epoch_batches(0)
        for idx in plan:
            a, b = collate(split, idx, *specials), one_by_one(split, idx, *specials)
            assert all(torch.equal(x, y) for x, y in zip(a.__dict__.values(), b.__dict__.values()))
        times = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                for idx in plan:
                    t0 = time.perf_counter()
                    way(split, idx, *specials)
                    times[name].append(time.perf_counter() - t0)
        examples = int(statistics.median(len(idx) for idx in plan))
        for name, ts in times.items():
            lines.append(
                f"| {max_tokens:,} | {len(plan)} | {examples} | {name} | "
                f"{1000 * statistics.median(ts):.3f} |"
            )
            print(lines[-1], flush=True)
    arguments.save(args.out, lines, done=True)


if __name__ == "__main__":
    main()
