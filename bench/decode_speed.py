"""Decoding speed: greedy and beam search, cached vs uncached, ours vs Hugging Face Marian.

    python bench/decode_speed.py [--ckpt TF.pt] [--rnn-ckpt RNN.pt] [--threads N]
        [--limit N] [--profile] [--out results/decode/NAME.md]

Multi30k test2016 de->en sources (1,000 sentences), cut into batches exactly as translate.py
does (sorted by length, ``decode.max_tokens`` source tokens each). For the Transformer and the
Bahdanau RNN (trained checkpoints when given, for realistic output lengths; else random
weights of conf/model/*.yaml with the 8k joint vocabulary):

1. greedy and beam 5 (conf/decode/{greedy,beam}.yaml) with the incremental cache, and again
   through ``search.Uncached``, which re-runs the decoder over the whole prefix at every step;
   sentences/s, output tokens/s (best hypothesis, EOS included), and whether the two give the
   same hypotheses;
2. our Transformer against ``MarianMTModel.generate()`` built from a ``MarianConfig`` of the
   same size (random weights, no download), on the same batches, every output forced to the
   same length L (ours: min_len = L and at most L + 1 tokens with EOS; Marian:
   min_new_tokens = L, max_new_tokens = L + 1, EOS forced last), so both run L + 1 decoder
   steps per sentence. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import arguments  # noqa: E402
from train_speed import machine, marian  # noqa: E402

from transformer.data import load_split, plan_batches  # noqa: E402
from transformer.run_data import prepare_data  # noqa: E402
from transformer.search import Uncached  # noqa: E402
from transformer.translator import (  # noqa: E402
    build_model,
    decode_options,
    encode_sources,
    load_for_inference,
    search,
)

MODELS = {"transformer": "ckpt", "rnn": "rnn_ckpt"}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose("train", overrides=overrides)


def load_model(name: str, ckpt: str | None, device):
    """(model, tgt tokenizer, source ids of test2016, model config dict, what it is)."""
    if ckpt:
        model, src_tok, tgt_tok, cfg = load_for_inference(ckpt, device)
        data_cfg = OmegaConf.create(cfg["data"])
        what = f"trained checkpoint `{ckpt}` ({checkpoint_note(ckpt)})"
    else:
        cfg = compose([f"model={name}", "run_dir=/tmp/decode-bench"])
        splits, src_tok, tgt_tok, _ = prepare_data(cfg, Path(tempfile.mkdtemp()))
        torch.manual_seed(0)
        V = len(tgt_tok)
        model = build_model(cfg.model, len(src_tok), V, tgt_tok.pad_id).to(device).eval()
        cfg, data_cfg = OmegaConf.to_container(cfg, resolve=True), cfg.data
        what = f"random weights, conf/model/{name}.yaml, vocabulary {V}"
    lines = list(load_split(data_cfg, "test2016")["src"])
    ids = encode_sources(lines, src_tok, data_cfg.max_len)
    return model, tgt_tok, ids, cfg["model"], what


def checkpoint_note(path: str) -> str:
    """The test2016 BLEU its run recorded (metrics.json beside checkpoints/), if any, with
    the hypothesis file and signature it was computed from: commit that file with the table."""
    run = Path(path).resolve().parent.parent
    if not (run / "metrics.json").is_file():
        return "no metrics.json in its run directory"
    m = json.loads((run / "metrics.json").read_text())
    test = m["test2016"]
    return (
        f"{m['steps']} training steps, test2016 BLEU {test['bleu']} (beam; hypotheses "
        f"{run / 'test2016.hyp'}; {test.get('bleu_signature', 'no signature recorded')})"
    )


def make_batches(ids: list[list[int]], pad: int, max_tokens: int, device):
    """[(input indices, src (B, S), src_mask (B, S))] as translator.translate_ids cuts them."""
    lengths = np.array([len(s) for s in ids])
    out = []
    for chunk in plan_batches(lengths, max_tokens, rng=None):
        S = int(lengths[chunk].max())
        src = torch.full((len(chunk), S), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            src[row, : len(ids[i])] = torch.tensor(ids[i])
        src = src.to(device)
        out.append((chunk, src, src != pad))
    return out


def timed(fn, batches, device):
    """Run ``fn(src, mask) -> per-row result`` over all batches after a small warm-up;
    (seconds, results in input order)."""
    _, src, mask = batches[0]
    fn(src[:4], mask[:4])  # first use of the code paths, not throughput
    sync(device)
    results: list = [None] * sum(len(c) for c, _, _ in batches)
    start = time.perf_counter()
    for chunk, src, mask in batches:
        for i, r in zip(chunk, fn(src, mask)):
            results[i] = r
    sync(device)
    return time.perf_counter() - start, results


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model, tok, opts):
    """Batch decoder: best hypothesis of each row, as (tokens, score)."""

    def fn(src, mask):
        nbest = search(model, src, mask, tok.bos_id, tok.eos_id, opts, pad_id=tok.pad_id)
        return [(h[0].tokens, h[0].score) for h in nbest]

    return fn


def theirs(hf, tok, beams: int, length: int):
    """Marian's generate(), outputs forced to ``length`` tokens then EOS; (tokens, None) rows."""
    extra = {"length_penalty": 0.6, "early_stopping": False} if beams > 1 else {}

    def fn(src, mask):
        out = hf.generate(
            input_ids=src,
            attention_mask=mask.long(),
            num_beams=beams,
            do_sample=False,
            min_new_tokens=length,
            max_new_tokens=length + 1,
            eos_token_id=tok.eos_id,
            forced_eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            decoder_start_token_id=tok.bos_id,
            **extra,
        )  # (B, 1 + length + 1): decoder start, tokens, EOS
        return [(row[1:].tolist(), None) for row in out]

    return fn


def rate(seconds: float, hyps: list) -> tuple[float, float]:
    """(sentences/s, output tokens/s) of the best hypotheses (ours: EOS counted once)."""
    tokens = sum(len(t) + 1 for t, _ in hyps)
    return len(hyps) / seconds, tokens / seconds


def cache_rows(name, model, tok, batches, searches, device):
    """Cached vs uncached for each search: table rows and a result per search."""
    rows, found = [], {}
    for sname, opts in searches.items():
        runs = {}
        for cache, m in (("cached", model), ("uncached", Uncached(model))):
            runs[cache] = timed(ours(m, tok, opts), batches, device)
            sent_s, tok_s = rate(*runs[cache])
            print(f"{name} {sname} {cache}: {sent_s:.1f} sent/s {tok_s:.0f} tok/s", flush=True)
        (t_c, hyp_c), (t_u, hyp_u) = runs["cached"], runs["uncached"]
        same = sum(a[0] == b[0] for a, b in zip(hyp_c, hyp_u))
        score_diff = max(abs(a[1] - b[1]) for a, b in zip(hyp_c, hyp_u))
        speedup = t_u / t_c
        found[sname] = dict(speedup=speedup, same=same, n=len(hyp_c))
        for cache, (secs, hyps) in runs.items():
            sent_s, tok_s = rate(secs, hyps)
            mean_len = sum(len(t) for t, _ in hyps) / len(hyps)
            extra = (
                f"{speedup:.2f}x | {same}/{len(hyps)} (max score diff {score_diff:.1e})"
                if cache == "cached"
                else " | "
            )
            rows.append(
                f"| {name} | {sname} | {cache} | {sent_s:,.1f} | {tok_s:,.0f} | {mean_len:.1f} | "
                f"{secs:.1f} | {extra} |"
            )
    return rows, found


def marian_rows(model, mcfg, tok, batches, searches, length, device):
    """Ours vs Marian at forced output length ``length``; rows and ratio per search."""
    hf = marian(mcfg, len(tok), tok.pad_id, tok.bos_id, tok.eos_id).to(device).eval()
    rows, ratios = [], {}
    for sname, opts in searches.items():
        forced = OmegaConf.merge(opts, {"min_len": length, "max_len_a": 0.0})
        forced.max_len_b = length + 1
        with torch.no_grad():
            t_o, h_o = timed(ours(model, tok, forced), batches, device)
            t_m, h_m = timed(theirs(hf, tok, opts.beam_size, length), batches, device)
        ok_o = all(len(t) == length for t, _ in h_o)
        ok_m = all(len(t) == length + 1 and t[-1] == tok.eos_id for t, _ in h_m)
        (s_o, _), (s_m, _) = rate(t_o, h_o), rate(t_m, h_m)
        ratios[sname] = s_o / s_m
        print(f"marian {sname}: ours {s_o:.1f} theirs {s_m:.1f} sent/s", flush=True)
        rows.append(
            f"| {sname} | {length} | {s_o:,.1f} | {s_m:,.1f} | {s_o / s_m:.2f}x | "
            f"{'yes' if ok_o and ok_m else 'NO'} |"
        )
    return rows, ratios


def profile_beam(name, model, tok, batches, opts) -> list[str]:
    """Where a cached beam search over the largest batch spends its time: torch ops by self
    time, and Python functions by own time (cProfile)."""
    _, src, mask = max(batches, key=lambda b: b[1].numel())
    fn = ours(model, tok, opts)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(src, mask)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    pr = cProfile.Profile()
    pr.runcall(fn, src, mask)
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(12)
    body = text.getvalue()
    body = body[body.index("ncalls") :] if "ncalls" in body else body
    return [
        f"### {name}: cached beam 5 on one batch of {src.shape[0]} sentences "
        f"(source length {src.shape[1]})",
        "",
        "torch operators by self CPU time (`torch.profiler`):",
        "```",
        ops.strip(),
        "```",
        "Python functions by own time (`cProfile`):",
        "```",
        body.strip(),
        "```",
        "",
    ]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--ckpt",
        type=arguments.in_file,
        help="trained Transformer checkpoint (else random weights)",
    )
    ap.add_argument(
        "--rnn-ckpt", type=arguments.in_file, help="trained RNN checkpoint (else random weights)"
    )
    ap.add_argument("--models", type=arguments.names(MODELS), default="transformer,rnn")
    ap.add_argument("--device", type=arguments.device, default="auto")
    ap.add_argument("--threads", type=arguments.count(1), default=len(os.sched_getaffinity(0)))
    ap.add_argument("--limit", type=arguments.count(1), help="only the first N test sentences")
    ap.add_argument(
        "--length",
        type=arguments.count(1),
        help="forced length L for the Marian comparison "
        "(default: mean reference length in subwords)",
    )
    ap.add_argument("--no-marian", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile cached beam search")
    ap.add_argument(
        "--baseline",
        metavar="GITREF",
        help="also time the cached searches of this git commit's transformer/ package "
        "(needs --ckpt / --rnn-ckpt; CPU)",
    )
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    if args.baseline:  # both found only after the first model was timed
        if not any(getattr(args, MODELS[name]) for name in args.models):
            ap.error("--baseline needs --ckpt or --rnn-ckpt of a model in --models")
        commit = f"{args.baseline}^{{commit}}"
        known = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", commit],
            capture_output=True,
        )
        if known.returncode:
            ap.error(f"--baseline {args.baseline}: no such commit in {ROOT}")
    args.given = arguments.given(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    load_before = uptime()
    decode = {
        s: decode_options(compose([f"decode={d}", "run_dir=/tmp/decode-bench"]).decode)
        for s, d in (("greedy", "greedy"), ("beam 5", "beam"))
    }
    table, marian_table, profiles, found, before = [], [], [], {}, []
    for name in args.models:
        model, tok, ids, mcfg, what = load_model(name, getattr(args, MODELS[name]), device)
        ids = ids[: args.limit]
        batches = make_batches(ids, tok.pad_id, decode["greedy"].max_tokens, device)
        found[name] = dict(what=what, params=model.num_parameters(), n=len(ids))
        rows, found[name]["cache"] = cache_rows(name, model, tok, batches, decode, device)
        table += rows
        if name == "transformer" and not args.no_marian:
            length = args.length or reference_length(tok, args.limit)
            marian_table, found["marian"] = marian_rows(
                model, mcfg, tok, batches, decode, length, device
            )
        if args.profile:
            profiles += profile_beam(name, model, tok, batches, decode["beam 5"])
        ckpt = getattr(args, MODELS[name])
        if args.baseline and ckpt:
            before += baseline_rows(args.baseline, name, ckpt, ids, decode, args.threads)
        del model
    load_after = uptime()
    tables = (table, marian_table, before)
    text = report(args, device, decode, found, tables, profiles, (load_before, load_after))
    print(text)
    arguments.save(args.out, [text.rstrip("\n")], done=True)


def reference_length(tok, limit) -> int:
    """Mean subword length of the test2016 English references (the realistic L)."""
    refs = list(load_split(compose(["run_dir=/tmp/decode-bench"]).data, "test2016")["tgt"])
    ids = tok.encode(refs[:limit])
    return round(sum(map(len, ids)) / len(ids))


# Times translate_ids of the package under argv[1] in a fresh process; argv = package root,
# threads, checkpoint, ids json, decode configs json. Also counts the decoder rows computed
# (batch rows summed over steps): the work a search asks of the model.
BASELINE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from omegaconf import OmegaConf
from transformer.translator import load_for_inference, translate_ids
torch.set_num_threads(int(sys.argv[2]))
device = torch.device("cpu")
model, _, tok, _ = load_for_inference(sys.argv[3], device)
ids = json.loads(open(sys.argv[4]).read())
rows, step = [0], model.decode_step
def counted(prev, enc, state):
    rows[0] += prev.shape[0]
    return step(prev, enc, state)
model.decode_step = counted
out = {}
for name, dec in json.loads(sys.argv[5]).items():
    dec = OmegaConf.create(dec)
    translate_ids(model, ids[:4], tok, dec, device)
    rows[0] = 0
    start = time.perf_counter()
    res = translate_ids(model, ids, tok, dec, device)
    out[name] = [time.perf_counter() - start, [r[0][0] for r in res], rows[0]]
print(json.dumps(out))
"""


def run_package(root: Path, ckpt: str, ids_file: Path, decode, threads: int) -> dict:
    """{search: [seconds, best tokens per input, decoder rows]} from ``BASELINE``."""
    configs = json.dumps({s: OmegaConf.to_container(d) for s, d in decode.items()})
    args = [str(root), str(threads), str(Path(ckpt).resolve()), str(ids_file), configs]
    proc = subprocess.run(
        [sys.executable, "-c", BASELINE, *args], capture_output=True, text=True, cwd=root
    )
    if proc.returncode != 0:
        raise RuntimeError(f"timing {root} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rows(ref: str, name: str, ckpt: str, ids, decode, threads: int) -> list[str]:
    """The cached searches of this tree and of git ``ref`` (its transformer/ package), each
    through its own ``translate_ids`` in a fresh process: speed-up, work, same outputs."""
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "transformer"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "ids.json").write_text(json.dumps(ids))
    old = run_package(tmp, ckpt, tmp / "ids.json", decode, threads)
    new = run_package(ROOT, ckpt, tmp / "ids.json", decode, threads)
    rows, n = [], len(ids)
    for sname in decode:
        (t_old, h_old, r_old), (t_new, h_new, r_new) = old[sname], new[sname]
        same = sum(a == b for a, b in zip(h_new, h_old))
        print(f"{name} {sname}: {ref} {n / t_old:.1f} now {n / t_new:.1f} sent/s", flush=True)
        rows.append(
            f"| {name} | {sname} | {n / t_old:,.1f} | {n / t_new:,.1f} | {t_old / t_new:.2f}x | "
            f"{r_old / n:,.0f} | {r_new / n:,.0f} | {same}/{n} |"
        )
    return rows


def bar(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def setup_lines(args, device, decode, found, loads) -> list[str]:
    """The report's header: machine, software, command, load, data, configs, models."""
    cmd = f"python bench/decode_speed.py {args.given}".rstrip()
    beam, greedy = decode["beam 5"], decode["greedy"]
    lines = [
        f"# Decoding speed: cached vs uncached, ours vs HF Marian ({machine(device)})",
        "",
        f"- device: {machine(device)}; torch {torch.__version__}; "
        f"transformers {transformers_version()}; torch threads {torch.get_num_threads()} "
        f"(of {os.cpu_count()} CPUs)",
        f"- command: `{cmd}`",
        f"- load before: `{loads[0]}`",
        f"- load after: `{loads[1]}`",
        "- data: Multi30k test2016 de->en sources, batches as translate.py cuts them "
        f"(sorted by length, at most {greedy.max_tokens} source tokens each)",
        f"- greedy: conf/decode/greedy.yaml; beam 5: conf/decode/beam.yaml (beam "
        f"{beam.beam_size}, GNMT alpha {beam.length_penalty}, length limit "
        f"{beam.max_len_a} * len(src) + {beam.max_len_b}, min_len {beam.min_len})",
        "- uncached: `search.Uncached`, the model's `decode_prefix` over the whole prefix at "
        "every step; same search code and batches",
        "- tokens/s: tokens of the best hypothesis per sentence, EOS included; one timed pass "
        "after a 4-sentence warm-up",
    ]
    for name in args.models:
        f = found[name]
        lines.append(
            f"- {name}: {f['what']}; {f['params'] / 1e6:.2f}M parameters; {f['n']} sentences"
        )
    return lines


def report(args, device, decode, found, tables, profiles, loads) -> str:
    """The markdown report: setup, the tables, the bars, profiles."""
    table, marian_table, before = tables
    lines = setup_lines(args, device, decode, found, loads)
    lines += [
        "",
        "## Cached vs uncached",
        "",
        "| model | search | decoding | sent/s | tokens/s | mean length | seconds | "
        "cached speed-up | same hypotheses |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
        *table,
        "",
    ]
    if marian_table:
        lines += [
            "## Our Transformer vs `MarianMTModel.generate()`, equal output lengths",
            "",
            "Marian is built from a `MarianConfig` of the same size (random weights); every "
            "output of both is forced to L tokens then EOS, so both run L + 1 decoder steps "
            "per sentence on the same batches.",
            "",
            "| search | L | ours sent/s | Marian sent/s | ours / Marian | lengths as forced |",
            "|---|---:|---:|---:|---:|---|",
            *marian_table,
            "",
        ]
    if before:
        lines += [
            f"## This tree vs commit `{args.baseline}` (cached search)",
            "",
            "Each through its own `translate_ids`, in a fresh process, on the same inputs and "
            "decode config. Decoder rows: batch rows the model decodes, summed over steps, per "
            "sentence (beam 5 counts 5 per step while a sentence is in the batch).",
            "",
            f"| model | search | {args.baseline} sent/s | now sent/s | speed-up | "
            f"decoder rows / sentence, {args.baseline} | now | same hypotheses |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            *before,
            "",
        ]
    lines += ["## Bars", ""]
    for name in args.models:
        c = found[name]["cache"]["beam 5"]
        ok = c["speedup"] >= 3.0 and c["same"] == c["n"]
        lines.append(
            f"- {name}: cached beam 5 is {c['speedup']:.2f}x uncached (bar 3x) with "
            f"{c['same']}/{c['n']} identical hypotheses: {bar(ok)}"
        )
    if "marian" in found:
        r = found["marian"]["beam 5"]
        lines.append(f"- Transformer beam 5 vs Marian: {r:.2f}x (bar 1.5x): {bar(r >= 1.5)}")
    if profiles:
        lines += ["", "## Profiles", "", *profiles]
    return "\n".join(lines) + "\n"


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


if __name__ == "__main__":
    main()
