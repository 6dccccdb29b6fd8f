"""Data pipeline at scale (issue 9): tokenizer training, encoding, cache size, peak memory and
time to the first training step, for synthetic corpora of growing size.

Each corpus is made at run time under --work by recombining Multi30k training pairs (pair i
joins pairs a_i and b_i of a seeded draw, source with source and target with target), so
sentences are real text and twice Multi30k's length; valid/test2016 are Multi30k's own.
Per size:
  prepare   a child process runs open_split + train_or_load + encode_split on an empty
            cache: text-to-Arrow time, tokenizer time, encoding time, cache size on disk;
            peak RSS: the largest sum of RSS over the child and its workers (/proc).
  cold      ``train.py trainer.max_steps=1`` on an empty cache: seconds from launch until
            train_log.csv holds step 1 (the run is then stopped: evaluation is not timed).
  warm      the same command again on the filled cache.
Reading: on the largest corpus, a child process reads every batch of one training epoch
(TokenBatcher, as the trainer does, without the model) from the warm cache, once with the
default ``data.mapped_budget_mb`` and once with 0 (mapped pages never released): peak memory
over a whole epoch, which the short training run below does not reach.
Throughput: target tokens/s over --steps steps (first log window left out), same model, on
the largest corpus and on Multi30k.

    python bench/data_scale.py --sizes 100000 1000000 5000000 --out results/data-scale
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
TRAIN = [sys.executable, str(ROOT / "train.py")]
COMMON = ["trainer.progress_bar=false", "device=cpu", "decode=greedy"]
EXTRA: list[str] = []  # overrides from the command line (--num-proc), for every run


def read(split: str, lang: str) -> list[str]:
    with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def make_corpus(root: Path, size: int, seed: int = 0) -> Path:
    """root/multi30k/{train,valid,test2016}.{de,en}; train has ``size`` recombined pairs."""
    d = root / "multi30k"
    if (d / "train.en").is_file():
        return root
    d.mkdir(parents=True, exist_ok=True)
    de, en = read("train", "de"), read("train", "en")
    rng = np.random.default_rng(seed)
    with open(d / "train.de", "w") as fd, open(d / "train.en", "w") as fe:
        for start in range(0, size, 100_000):
            n = min(100_000, size - start)
            a, b = rng.integers(0, len(de), n), rng.integers(0, len(de), n)
            fd.writelines(f"{de[i]} {de[j]}\n" for i, j in zip(a, b))
            fe.writelines(f"{en[i]} {en[j]}\n" for i, j in zip(a, b))
    for split in ("valid", "test2016"):
        for lang in ("de", "en"):
            (d / f"{split}.{lang}").write_text("\n".join(read(split, lang)) + "\n")
    return root


MEM_FIELDS = ("Rss", "Pss", "Pss_Anon")  # of /proc/PID/smaps_rollup, in kB


def tree_memory(pid: int) -> dict[str, int]:
    """Bytes of memory of ``pid`` and all its descendants, summed over the processes:
    Rss (what ``ps`` shows; pages shared by several processes, such as the shared libraries
    and the memory-mapped Arrow files the encoding workers all read, count once per process),
    Pss (each shared page divided among its sharers: the tree's real share of RAM, page cache
    of mapped files included), Pss_Anon (the anonymous part of Pss: heap and stacks, memory
    that cannot be dropped and re-read from disk)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = dict.fromkeys(MEM_FIELDS, 0), [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return total


def watch(cmd: list[str], done=None, timeout: float = 7200) -> dict:
    """Run ``cmd`` polling its tree's RSS; stop it when ``done()`` is true. Returns seconds
    (to done, or to exit), peak RSS in bytes, and the return code (None if stopped)."""
    out_path = Path(f"/tmp/data-scale-{os.getpid()}-{time.monotonic_ns()}.log")
    peak, seconds, rc = dict.fromkeys(MEM_FIELDS, 0), None, None
    start = time.perf_counter()
    with open(out_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        while True:
            now = tree_memory(proc.pid)
            peak = {k: max(peak[k], now[k]) for k in MEM_FIELDS}  # each its own peak
            if done is not None and done():
                seconds = time.perf_counter() - start
                os.killpg(proc.pid, signal.SIGKILL)  # our child; SIGTERM would evaluate
                proc.wait()
                break
            if proc.poll() is not None:
                seconds, rc = time.perf_counter() - start, proc.returncode
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(" ".join(cmd))
            time.sleep(0.2)
    if rc not in (None, 0):
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {out_path}")
    mb = {f"peak_{k.lower()}_mb": round(v / 2**20) for k, v in peak.items()}
    return {"seconds": round(seconds, 2), **mb, "log": str(out_path)}


def prepare_child(data_dir: str, cache_dir: str, overrides: list[str]) -> None:
    """(child) Time the tokenizer and the encoding of every split; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from transformer.corpus_cache import encode_split, open_split, sample_sentences
    from transformer.tokenizer import train_or_load

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        base = [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}"]
        cfg = compose("train", base + overrides)
    d, cache = cfg.data, Path(cache_dir)
    start = time.perf_counter()
    sources = {s: open_split(d, s, cache) for s in [d.train_split, d.valid_split, *d.test_splits]}
    fp, load = sources[d.train_split]
    load()  # local text -> raw Arrow (memory-mapped)
    read_s = time.perf_counter() - start
    texts = lambda: sample_sentences(load(), ["src", "tgt"], d.spm_input_sentence_size, cfg.seed)  # noqa: E731
    tok = train_or_load(
        texts, cache / "spm", d.vocab_size, d.spm_model_type, d.character_coverage,
        d.spm_input_sentence_size, cfg.seed, key=f"{fp}|src+tgt",
    )  # fmt: skip
    spm_s = time.perf_counter() - start - read_s
    for name, (fp, load) in sources.items():
        encode_split(f"{fp}|{d.src_lang}-{d.tgt_lang}", load, tok, tok, d.max_len,
                     name == d.train_split, f"{d.name}/{name}", cache, d.num_proc)  # fmt: skip
    encode_s = time.perf_counter() - start - read_s - spm_s
    times = {"read_s": read_s, "spm_s": spm_s, "encode_s": encode_s}
    print(json.dumps({k: round(v, 1) for k, v in times.items()}), flush=True)


def epoch_child(data_dir: str, cache_dir: str, run_dir: str, overrides: list[str]) -> None:
    """(child) Read every batch of training epoch 0 from the cache; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from transformer.data import TokenBatcher
    from transformer.run_data import prepare_data
    from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        base = [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}"]
        cfg = compose("train", base + overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    splits = prepare_data(cfg, Path(run_dir))[0]
    train = splits[cfg.data.train_split]
    batcher = TokenBatcher(train, cfg.data.max_tokens, cfg.seed, (PAD_ID, BOS_ID, EOS_ID))
    start = time.perf_counter()
    batches = batcher.epoch_batches(0)
    for idx in batches:
        batcher.batch(idx)
    seconds = time.perf_counter() - start
    releases = train.pages.releases if train.pages is not None else 0
    print(json.dumps({"batches": len(batches), "read_s": round(seconds, 1), "releases": releases}))


def read_epoch(data_dir: Path, cache_dir: Path, run_dir: Path, budget_mb: int | None) -> dict:
    overrides = [*EXTRA] + ([] if budget_mb is None else [f"data.mapped_budget_mb={budget_mb}"])
    child = [sys.executable, __file__, "--child-epoch", str(data_dir), str(cache_dir),
             str(run_dir), *overrides]  # fmt: skip
    r = watch(child)
    out = json.loads(Path(r["log"]).read_text().strip().splitlines()[-1])
    budget = "default" if budget_mb is None else budget_mb
    return {"mapped_budget_mb": budget, **out} | {
        k: v for k, v in r.items() if k.startswith("peak_")
    }


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def steps_logged(run_dir: Path, steps: int):
    def done() -> bool:
        f = run_dir / "train_log.csv"
        if not f.is_file():
            return False
        rows = list(csv.DictReader(f.open()))
        return bool(rows) and int(rows[-1]["step"]) >= steps

    return done


def train_cmd(data_dir: Path, cache_dir: Path, run_dir: Path, steps: int, log_every: int):
    return [
        *TRAIN,
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.log_every={log_every}",
        f"trainer.eval_every={steps + 1000}",
        *COMMON,
        *EXTRA,
    ]


def throughput(data_dir: Path, cache_dir: Path, run_dir: Path, steps: int) -> dict:
    """Mean target tokens/s over ``steps`` training steps (the first log window, warm-up,
    left out) and the peak memory of the run."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log_every = max(1, steps // 5)
    r = watch(
        train_cmd(data_dir, cache_dir, run_dir, steps, log_every), steps_logged(run_dir, steps)
    )
    rows = list(csv.DictReader((run_dir / "train_log.csv").open()))[1:]
    out = {"tokens_per_s": round(float(np.mean([float(x["tokens_per_s"]) for x in rows])))}
    return out | {k: v for k, v in r.items() if k.startswith("peak_")}


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import arguments  # here, not above: the child processes measure their memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = [100_000, 1_000_000, 5_000_000]
    ap.add_argument("--sizes", type=arguments.count(1), nargs="+", default=sizes)
    ap.add_argument("--out", type=arguments.out_folder, default=ROOT / "results" / "data-scale")
    ap.add_argument("--work", type=arguments.out_folder, default=Path("/tmp/data-scale"))
    ap.add_argument(
        "--steps",
        type=arguments.count(2),
        default=50,
        help="steps for the tokens/s comparison (the first log window is left out)",
    )
    ap.add_argument(
        "--num-proc", type=arguments.count(1), help="data.num_proc for every run (default: config)"
    )
    ap.add_argument("--no-throughput", action="store_true", help="skip the tokens/s comparison")
    args = ap.parse_args(argv)
    args.given = arguments.given(argv)
    if args.num_proc:
        EXTRA.append(f"data.num_proc={args.num_proc}")
    rows = []
    for size in args.sizes:
        data = make_corpus(args.work / f"corpus-{size}", size)
        cache, run = args.work / f"cache-{size}", args.work / f"run-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        child = [sys.executable, __file__, "--child-prepare", str(data), str(cache), *EXTRA]
        prep = watch(child)
        times = json.loads(Path(prep["log"]).read_text().strip().splitlines()[-1])
        row = {"pairs": size, **times}
        row.update({f"prepare_{k}": v for k, v in prep.items() if k.startswith("peak_")})
        row["cache_mb"] = round(du(cache) / 2**20)
        row["cache_encoded_mb"] = round(du(cache / "encoded") / 2**20)
        for phase in ("cold", "warm"):
            if phase == "cold":
                shutil.rmtree(cache)
            shutil.rmtree(run, ignore_errors=True)
            r = watch(train_cmd(data, cache, run, 1, 1), steps_logged(run, 1))
            row[f"first_step_{phase}_s"] = r["seconds"]
            row.update(
                {f"first_step_{phase}_{k}": v for k, v in r.items() if k.startswith("peak_")}
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    largest = max(args.sizes)
    corpus, cache = args.work / f"corpus-{largest}", args.work / f"cache-{largest}"
    reading = [read_epoch(corpus, cache, args.work / "epoch", b) for b in (None, 0)]
    for r in reading:
        print(json.dumps(r), flush=True)
    tps = (
        {}
        if args.no_throughput
        else {
            f"synthetic {largest:,}": throughput(
                args.work / f"corpus-{largest}",
                args.work / f"cache-{largest}",
                args.work / "tps",
                args.steps,
            ),  # fmt: skip
            "Multi30k": throughput(
                MULTI30K.parent, args.work / "cache-multi30k", args.work / "tps", args.steps
            ),  # fmt: skip
        }
    )
    write_results(args.out, rows, reading, tps, args)


def md_table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    fmt = lambda v: f"{v:,}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    return [
        "| " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---:|" * len(cols),
        *("| " + " | ".join(fmt(r[k]) for k, _ in cols) + " |" for r in rows),
    ]


def write_results(out: Path, rows: list[dict], reading: list[dict], tps: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    sys.path.insert(0, str(ROOT))
    from transformer.settings import cpu_model

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": f"python bench/data_scale.py {args.given}".rstrip(),
    }
    (out / "data_scale.json").write_text(
        json.dumps({"meta": meta, "sizes": rows, "reading": reading, "tokens_per_s": tps}, indent=2)
        + "\n"
    )
    times = [
        ("pairs", "pairs"),
        ("read_s", "text to Arrow s"),
        ("spm_s", "tokenizer s"),
        ("encode_s", "encoding s"),
        ("cache_mb", "cache MB"),
        ("first_step_cold_s", "first step, cold cache s"),
        ("first_step_warm_s", "first step, warm cache s"),
    ]
    phases = [("prepare", "preprocessing"), ("first_step_cold", "cold start"),
              ("first_step_warm", "warm start")]  # fmt: skip
    kinds = [("rss", "RSS"), ("pss", "PSS"), ("pss_anon", "anonymous")]
    memory = [("pairs", "pairs")] + [
        (f"{p}_peak_{k}_mb", f"{pl}: {kl}") for p, pl in phases for k, kl in kinds
    ]
    lines = [
        "# Data pipeline at scale",
        "",
        f"`{meta['command']}`; {meta['machine']}, Python {meta['python']}, torch {meta['torch']}.",
        "",
        "Seconds and cache size (preprocessing: text to Arrow, SentencePiece on a sample of at "
        "most `data.spm_input_sentence_size` sentences, encoding of all splits; first step: "
        "`train.py` launched until step 1 is logged):",
        "",
    ]
    lines += md_table(rows, times)
    lines += [
        "",
        "Peak memory, MB, of the process and all its workers (sampled every 0.2 s from "
        "/proc/PID/smaps_rollup, summed over the processes): RSS counts a page shared by "
        "several processes (libraries, the memory-mapped Arrow files the encoding workers "
        "read) once per process; PSS splits it among them (the tree's real share of RAM, page "
        "cache of mapped files included); anonymous is the heap part of PSS, memory that "
        "cannot be dropped and re-read from disk.",
        "",
    ]
    lines += md_table(rows, memory)
    largest = max(r["pairs"] for r in rows)
    lines += [
        "",
        f"Reading one training epoch of the {largest:,}-pair corpus from the warm cache (every "
        "batch collated, no model), with the mapped pages released whenever more than "
        "`data.mapped_budget_mb` of them are resident, and never (0):",
        "",
    ]
    read_cols = [("mapped_budget_mb", "data.mapped_budget_mb"), ("batches", "batches"),
                 ("read_s", "seconds"), ("releases", "releases")]  # fmt: skip
    lines += md_table(reading, read_cols + [(f"peak_{k}_mb", f"peak {kl} MB") for k, kl in kinds])
    train_cols = [("name", "corpus"), ("tokens_per_s", "target tokens/s")] + [
        (f"peak_{k}_mb", f"peak {kl} MB") for k, kl in kinds
    ]
    if tps:
        lines += ["", "Training (same model and settings, `--steps` steps):", ""]
        lines += md_table([{"name": k, **v} for k, v in tps.items()], train_cols)
    (out / "data_scale.md").write_text("\n".join(lines) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["pairs"] for r in rows]
    for key, label in [("spm_s", "tokenizer"), ("encode_s", "encoding"),
                       ("first_step_cold_s", "first step, cold"),
                       ("first_step_warm_s", "first step, warm")]:  # fmt: skip
        ax1.plot(n, [r[key] for r in rows], "o-", label=label)
    for (p, pl), style in zip(phases, ("o", "s", "^")):
        for (k, kl), line in zip(kinds, ("-", "--", ":")):
            values = [r[f"{p}_peak_{k}_mb"] / 1024 for r in rows]
            ax2.plot(n, values, style + line, label=f"{pl}, {kl}")
    ax2.axhline(3, color="grey", lw=0.8)
    for ax, y in ((ax1, "seconds"), (ax2, "peak memory, GiB (process + workers)")):
        ax.set_xscale("log")
        ax.set_xlabel("training pairs")
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "data_scale.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child-prepare":
        prepare_child(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) >= 5 and sys.argv[1] == "--child-epoch":
        epoch_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
