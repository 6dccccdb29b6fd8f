"""Measure three textbook claims about attention with this project's own attention code.

    python bench/attention_claims.py --out results/attention [--quick]

(1) Scaling by 1/sqrt(d_k) keeps the softmax from saturating (Vaswani et al. 2017, 3.2.1):
    entropy and largest weight of the attention rows of a freshly initialised Transformer
    self-attention (one head, d_model = d_k, inputs N(0, 1) as after a LayerNorm), with the
    scale (``scaled_dot``) and without (``dot``), for d_k = 64 ... 1024.
(2) h heads cost about as much as one head of the same d_model (3.2.2): analytic FLOPs and
    measured forward time of ``MultiHeadAttention`` for h = 1, 2, 4, 8, 16.
(3) Time and peak memory against sequence length n for scaled_dot (fused SDPA, and the
    explicit path that materialises the n x n weights), local, sparse (strided and fixed)
    and linear attention, bidirectional and causal, with the crossover points.

Peak memory is the largest amount of memory held by PyTorch's CPU allocator during one call
above what was held before it: torch.profiler with ``profile_memory=True`` records every
allocation and free, summed in time order (inputs excluded, the output included). Times are
the fastest of repeated calls after a warm-up, in ``torch.inference_mode``. Writes claims.json,
PNG plots and README.md (device, torch, command, load average) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arguments import count, device, number, out_folder  # noqa: E402

from transformer import attention as A  # noqa: E402
from transformer.settings import cpu_model  # noqa: E402
from transformer.transformer_model import Transformer  # noqa: E402


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Fastest wall time of ``fn()`` over ``repeats`` calls, in seconds (as ``timeit``
    advises: on a shared machine the slower calls measure the other jobs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


DEVICE = torch.device("cpu")  # --device cuda: claim (3) on the GPU
DTYPE = torch.float32  # bf16 on the GPU


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes by the CPU allocator while ``fn()`` runs (on CUDA:
    the caching allocator's peak of allocated bytes above what was allocated before)."""
    if DEVICE.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync()
        del out
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def log_ticks(ax, values) -> None:
    """Log-scale x axis labelled exactly at ``values`` (no minor labels)."""
    ax.set_xscale("log")
    ax.set_xticks(values, [str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def figure(cols: int, width=5.0, height=3.8):
    fig = Figure(figsize=(cols * width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols, squeeze=False)[0]


# -- (1) the scale --------------------------------------------------------------------------


def claim_scale(out: Path, dims, n: int, seeds: int) -> list[dict]:
    rows = []
    for d in dims:
        for kind in ("scaled_dot", "dot"):
            ent, top, std = [], [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = Transformer(8, 8, 0, d_model=d, n_heads=1, d_ff=8, attention={"kind": kind})
                mha = model.encoder[0].self_attn.eval()  # Transformer's own initialisation
                mha.need_weights = True
                x = torch.randn(4, n, d)  # (B, n, d): unit-variance inputs, as after LayerNorm
                with torch.inference_mode():
                    mha(x)
                    w = mha.last_weights  # (B, 1, n, n)
                    q, k = mha.project_q(x), mha.project_kv(x)[0]  # (B, 1, n, d)
                    logits = q @ k.transpose(-1, -2) * (d**-0.5 if kind == "scaled_dot" else 1)
                ent.append(float(-(w * w.clamp_min(1e-30).log()).sum(-1).mean()))
                top.append(float(w.amax(-1).mean()))
                std.append(float(logits.std()))
            mean = statistics.mean
            row = dict(d_k=d, kind=kind, entropy=mean(ent), max_weight=mean(top))
            rows.append(dict(row, logit_std=mean(std), uniform_entropy=math.log(n)))
    fig, (a, b) = figure(2)
    for kind, label in (("scaled_dot", "q.k / sqrt(d_k)"), ("dot", "q.k (no scale)")):
        sel = [r for r in rows if r["kind"] == kind]
        a.plot(dims, [r["entropy"] for r in sel], "o-", label=label)
        b.plot(dims, [r["max_weight"] for r in sel], "o-", label=label)
    a.axhline(math.log(n), ls="--", c="gray", label=f"uniform, log {n}")
    a.set(xscale="log", xlabel="d_k", ylabel="mean row entropy (nats)", title="attention entropy")
    b.set(xscale="log", xlabel="d_k", ylabel="mean largest weight", title="largest weight")
    for ax in (a, b):
        log_ticks(ax, dims)
        ax.legend()
    fig.savefig(out / "scale_softmax.png", dpi=110)
    return rows


# -- (2) heads ------------------------------------------------------------------------------


def mha_flops(B: int, n: int, d: int, h: int) -> dict:
    """Forward FLOPs of self-attention (multiply-add = 2): projections, scores, softmax."""
    proj = 4 * 2 * B * n * d * d  # q, k, v, out: (B n, d) x (d, d)
    scores = 2 * B * h * n * n * (d // h)  # q k^T per head
    mix = 2 * B * h * n * n * (d // h)  # weights @ v per head
    softmax = 5 * B * h * n * n  # max, subtract, exp, sum, divide: the only h-dependent term
    return dict(
        proj=proj, scores=scores + mix, softmax=softmax, total=proj + scores + mix + softmax
    )


def claim_heads(out: Path, heads, d: int, n: int, B: int, repeats: int) -> list[dict]:
    rows = []
    x = torch.randn(B, n, d)
    for h in heads:
        torch.manual_seed(0)
        mha = A.MultiHeadAttention(d, h).eval()
        with torch.inference_mode():
            t = best_time(lambda: mha(x), repeats)  # noqa: B023
        rows.append(dict(h=h, d_head=d // h, time_ms=t * 1e3, **mha_flops(B, n, d, h)))
    fig, (a, b) = figure(2)
    a.plot(heads, [r["time_ms"] for r in rows], "o-")
    a.set(xscale="log", xlabel="heads h", ylabel="ms per forward", title=f"time, d_model={d}")
    a.set_ylim(bottom=0)
    b.plot(heads, [r["total"] / 1e9 for r in rows], "o-", label="total")
    b.plot(heads, [r["softmax"] / 1e9 for r in rows], "s--", label="softmax part")
    b.set(xscale="log", xlabel="heads h", ylabel="GFLOP per forward", title="analytic FLOPs")
    b.set_ylim(bottom=0)
    for ax in (a, b):
        log_ticks(ax, heads)
    b.legend()
    fig.savefig(out / "heads.png", dpi=110)
    return rows


# -- (3) length -----------------------------------------------------------------------------


def length_kinds(n: int, window: int) -> dict:
    """label -> (kind, need_weights); the sparse stride is l = sqrt(n) (Child et al. 2019)."""
    stride = max(2, round(math.sqrt(n)))
    return {
        "scaled_dot (fused SDPA)": (A.ScaledDot(), False),
        "scaled_dot (explicit n x n)": (A.ScaledDot(), True),
        f"local (w={window})": (A.Local(window), False),
        "sparse strided (l=sqrt n)": (A.Sparse("strided", stride), False),
        "sparse fixed (l=sqrt n, c=1)": (A.Sparse("fixed", stride, 1), False),
        "linear (elu+1)": (A.Linear(64), False),
    }


def measure_length(lengths, h: int, d: int, window: int, repeats: int, budget_s: float):
    """Rows of (mode, kind, n, time_ms, peak_mib); a kind stops growing n past ``budget_s``."""
    rows, over = [], set()
    for causal in (False, True):
        mode = "causal" if causal else "bidirectional"
        for n in lengths:
            q, k, v = torch.randn(3, 1, h, n, d, device=DEVICE, dtype=DTYPE).unbind(0)
            for label, (kind, weights) in length_kinds(n, window).items():
                if (mode, label) in over:
                    continue
                call = lambda: kind(q, k, v, None, causal, 0.0, weights)  # noqa: E731, B023
                with torch.inference_mode():
                    t = best_time(call, repeats if n <= 1024 else max(2, repeats // 3))
                    mem = peak_bytes(call)
                rows.append(dict(mode=mode, kind=label, n=n, time_ms=t * 1e3, peak_mib=mem / 2**20))
                print(
                    f"  {mode:13s} n={n:5d} {label:30s} {t * 1e3:10.2f} ms {mem / 2**20:9.1f} MiB"
                )
                if t > budget_s:
                    over.add((mode, label))
    return rows


def crossover(ns, ours, ref) -> str:
    """Where ``ours`` first drops below ``ref`` (log-log interpolation between points)."""
    pairs = [(n, a, b) for n, a, b in zip(ns, ours, ref) if a and b]
    diff = [(n, math.log(a) - math.log(b)) for n, a, b in pairs]
    if not diff:
        return "not measured"
    if all(x < 0 for _, x in diff):
        return f"lower at every n measured ({diff[0][0]} to {diff[-1][0]})"
    if diff[0][1] < 0:  # lower at first, then not: where it stops being lower
        (n0, x0), (n1, x1) = next((a, b) for a, b in zip(diff, diff[1:]) if b[1] >= 0 > a[1])
        at = math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * x0 / (x0 - x1))
        return f"lower from n = {diff[0][0]} until n ~ {at:,.0f}"
    for (n0, x0), (n1, x1) in zip(diff, diff[1:]):
        if x0 >= 0 > x1:
            at = math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * x0 / (x0 - x1))
            later = " (crosses back later)" if any(x >= 0 for n, x in diff if n > n1) else ""
            return f"n ~ {at:,.0f}{later}"
    return f"never lower ({diff[0][0]} to {diff[-1][0]})"


def plot_length(out: Path, rows, lengths):
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    plots = (("time_ms", "length_time.png", "ms"), ("peak_mib", "length_memory.png", "MiB"))
    for key, name, unit in plots:
        fig, axes = figure(2)
        for ax, mode in zip(axes, ("bidirectional", "causal")):
            for kind in kinds:
                sel = [r for r in rows if r["kind"] == kind and r["mode"] == mode and r[key] > 0]
                ax.plot([r["n"] for r in sel], [r[key] for r in sel], "o-", label=kind, ms=3)
            ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=unit)
            ax.set_title(f"{mode} self-attention, {'time' if key == 'time_ms' else 'peak memory'}")
            log_ticks(ax, lengths)
            ax.legend(fontsize=7)
        fig.savefig(out / name, dpi=110)


def crossovers(rows) -> list[dict]:
    found = []
    for mode in ("bidirectional", "causal"):
        for ref in ("scaled_dot (fused SDPA)", "scaled_dot (explicit n x n)"):
            for kind in dict.fromkeys(r["kind"] for r in rows):
                if kind.startswith("scaled_dot"):
                    continue
                for key in ("time_ms", "peak_mib"):
                    series = {r["kind"]: {} for r in rows}
                    for r in rows:
                        if r["mode"] == mode:
                            series[r["kind"]][r["n"]] = r[key]
                    ns = sorted(set(series[kind]) & set(series[ref]))
                    where = crossover(
                        ns, [series[kind][n] for n in ns], [series[ref][n] for n in ns]
                    )
                    found.append(dict(mode=mode, kind=kind, vs=ref, metric=key, where=where))
    return found


# -- (0) the default path costs nothing -------------------------------------------------------


def default_overhead(repeats: int, rounds: int = 5) -> list[dict]:
    """``MultiHeadAttention`` (scaled_dot kind) against the same projections around a bare
    SDPA call, Multi30k-sized batch; alternated in rounds so that machine load hits both."""
    torch.manual_seed(0)
    B, n, d, h = 32, 32, 256, 4
    mha = A.MultiHeadAttention(d, h).eval()
    x = torch.randn(B, n, d)
    mask = A.padding_mask(torch.ones(B, n, dtype=torch.bool))

    def bare(causal):
        q, k, v = mha.project_qkv(x)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else mask, is_causal=causal
        )
        return mha.out_proj(o.transpose(1, 2).reshape(B, n, d))

    rows = []
    for causal in (False, True):
        key_mask = None if causal else mask
        ours, ref = [], []
        with torch.inference_mode():
            for _ in range(rounds):
                ours.append(best_time(lambda: mha(x, mask=key_mask, causal=causal), repeats))  # noqa: B023
                ref.append(best_time(lambda: bare(causal), repeats))  # noqa: B023
        row = dict(causal=causal, mha_ms=statistics.median(ours) * 1e3)
        rows.append(dict(row, bare_sdpa_ms=statistics.median(ref) * 1e3))
    return rows


# -- report ---------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def length_tables(rows, key: str, fmt: str) -> str:
    parts = []
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for mode in ("bidirectional", "causal"):
        cell = {(r["kind"], r["n"]): r[key] for r in rows if r["mode"] == mode}
        ns = sorted({n for _, n in cell})
        body = [
            [n] + [fmt.format(cell[k, n]) if (k, n) in cell else "-" for k in kinds] for n in ns
        ]
        parts.append(f"{mode}:\n\n" + table(["n"] + kinds, body))
    return "\n\n".join(parts)


def report(out: Path, meta: dict, scale, heads, length, cross, overhead) -> str:
    s = [
        "# Attention claims, measured",
        "",
        f"- command: `{meta['command']}`",
        f"- device: CPU, {meta['cpu']}, torch threads: {meta['threads']}; torch {meta['torch']}, "
        f"Python {meta['python']}",
        f"- load average (1 min) before / after: {meta['load_before']:.2f} / "
        f"{meta['load_after']:.2f} (a shared machine: times are noisy, compare shapes)",
        f"- wall time {meta['wall_s']:.0f} s; raw numbers in [claims.json](claims.json)",
        "",
        "## (0) The default path is a plain fused SDPA call",
        "",
        "`MultiHeadAttention` with the default `scaled_dot` kind against the same projections "
        "around a bare `F.scaled_dot_product_attention` call (B=32, n=32, d_model=256, h=4; "
        "median over alternated rounds of the fastest call):",
        "",
        table(
            ["self-attention", "MultiHeadAttention ms", "bare SDPA ms", "ratio"],
            [
                [
                    "causal" if r["causal"] else "padding mask",
                    f"{r['mha_ms']:.3f}",
                    f"{r['bare_sdpa_ms']:.3f}",
                    f"{r['mha_ms'] / r['bare_sdpa_ms']:.2f}",
                ]
                for r in overhead
            ],
        ),  # fmt: skip
        "",
        "## (1) 1/sqrt(d_k) keeps the softmax from saturating",
        "",
        f"One self-attention head of a freshly initialised `Transformer` (Xavier-uniform "
        f"projections), d_model = d_k, n = {scale[0]['uniform_entropy'] and meta['scale_n']} "
        "inputs drawn N(0, 1) (as after LayerNorm), means over rows and seeds. Uniform "
        f"attention has entropy log n = {scale[0]['uniform_entropy']:.2f} nats.",
        "",
        table(
            ["d_k", "score", "logit std", "row entropy (nats)", "largest weight"],
            [
                [
                    r["d_k"],
                    "q.k/sqrt(d_k)" if r["kind"] == "scaled_dot" else "q.k",
                    f"{r['logit_std']:.2f}",
                    f"{r['entropy']:.2f}",
                    f"{r['max_weight']:.3f}",
                ]
                for r in scale
            ],
        ),  # fmt: skip
        "",
        "![scale](scale_softmax.png)",
        "",
        "## (2) h heads cost about one head of the same d_model",
        "",
        f"`MultiHeadAttention` self-attention forward, d_model = {meta['heads_d']}, "
        f"B = {meta['heads_B']}, n = {meta['heads_n']}; FLOPs analytic (multiply-add = 2; "
        "softmax counted as 5 per score).",
        "",
        table(
            ["h", "d_head", "ms (fastest)", "GFLOP total", "of which softmax"],
            [
                [
                    r["h"],
                    r["d_head"],
                    f"{r['time_ms']:.2f}",
                    f"{r['total'] / 1e9:.3f}",
                    f"{r['softmax'] / 1e9:.3f}",
                ]
                for r in heads
            ],
        ),  # fmt: skip
        "",
        "![heads](heads.png)",
        "",
        "## (3) Time and peak memory against sequence length",
        "",
        f"One attention call of each kind on q, k, v of shape (1, h={meta['len_h']}, n, "
        f"d={meta['len_d']}) (projections excluded: they are the same for every kind), "
        "forward only. Peak memory: the largest amount held by PyTorch's CPU allocator during "
        "the call above what it held before (torch.profiler memory events, allocations minus "
        "frees in time order): the output and every temporary, not the inputs. `-`: not "
        f"measured, the kind took over {meta['budget_s']} s at a shorter n.",
        "",
        *length_section(length, cross, "Time (ms, fastest of the repeats):", "{:.2f}"),
    ]
    return "\n".join(s)


def length_section(length, cross, time_title: str, time_fmt: str) -> list[str]:
    """Claim (3)'s markdown lines: time and peak-memory tables, their plots, crossovers."""
    return [
        time_title,
        "",
        length_tables(length, "time_ms", time_fmt),
        "",
        "Peak memory (MiB):",
        "",
        length_tables(length, "peak_mib", "{:.1f}"),
        "",
        "![time](length_time.png)",
        "",
        "![memory](length_memory.png)",
        "",
        "Crossovers: the length from which a kind is cheaper than full attention.",
        "",
        table(
            ["mode", "kind", "vs", "time", "peak memory"],
            [
                [c["mode"], c["kind"], c["vs"], c["where"], m["where"]]
                for c, m in zip(cross[0::2], cross[1::2])
            ],
        ),  # fmt: skip
        "",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=out_folder, default="results/attention")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--repeats", type=count(1), default=9)
    p.add_argument("--budget-s", type=number(0), default=20.0, help="stop a kind's n sweep")
    p.add_argument("--threads", type=count(0), default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--device", type=device, default="cpu", help="cuda: only claim (3), in bf16, on the GPU"
    )
    args = p.parse_args(argv)
    if args.device.type != "cpu":
        return main_gpu(args, sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args_given = sys.argv[1:] if argv is None else argv
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, load_before = time.time(), os.getloadavg()[0]
    dims = [64, 128, 256, 512, 1024] if not args.quick else [64, 256]
    lengths = [128 * 2**i for i in range(7)] if not args.quick else [128, 256, 512]
    heads_cfg = dict(d=512, n=256, B=8) if not args.quick else dict(d=128, n=64, B=2)
    len_cfg = dict(h=4, d=64, window=64)
    print("(0) default path overhead")
    overhead = default_overhead(args.repeats)
    print("(1) scale")
    scale = claim_scale(out, dims, n=128, seeds=3)
    print("(2) heads")
    heads = claim_heads(
        out, [1, 2, 4, 8, 16], heads_cfg["d"], heads_cfg["n"], heads_cfg["B"], args.repeats
    )  # noqa: E501
    print("(3) length")
    length = measure_length(
        lengths, len_cfg["h"], len_cfg["d"], len_cfg["window"], args.repeats, args.budget_s
    )  # noqa: E501
    plot_length(out, length, lengths)
    cross = crossovers(length)
    meta = dict(
        command=" ".join(["python bench/attention_claims.py", *args_given]),
        cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), load_before=load_before, load_after=os.getloadavg()[0],
        wall_s=time.time() - t0, scale_n=128, heads_d=heads_cfg["d"], heads_n=heads_cfg["n"],
        heads_B=heads_cfg["B"], len_h=len_cfg["h"], len_d=len_cfg["d"], budget_s=args.budget_s,
    )  # fmt: skip
    data = dict(
        meta=meta, overhead=overhead, scale=scale, heads=heads, length=length, crossovers=cross
    )  # noqa: E501
    (out / "claims.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "README.md").write_text(report(out, meta, scale, heads, length, cross, overhead))
    print(f"wrote {out}/README.md, claims.json and plots")


def main_gpu(args, args_given) -> None:
    """Claim (3) on a GPU: the same kinds and lengths, bf16, CUDA-synchronised times, peak
    memory from the CUDA caching allocator."""
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [128 * 2**i for i in range(7)] if not args.quick else [128, 256, 512]
    len_cfg = dict(h=4, d=64, window=64)
    t0 = time.time()
    length = measure_length(
        lengths, len_cfg["h"], len_cfg["d"], len_cfg["window"], args.repeats, args.budget_s
    )
    plot_length(out, length, lengths)
    cross = crossovers(length)
    name = torch.cuda.get_device_name(DEVICE)
    meta = dict(
        command=" ".join(["python bench/attention_claims.py", *args_given]), device=name,
        torch=torch.__version__, dtype="bfloat16", wall_s=time.time() - t0, **len_cfg,
    )  # fmt: skip
    (out / "claims.json").write_text(
        json.dumps(dict(meta=meta, length=length, crossovers=cross), indent=1) + "\n"
    )
    text = [
        f"# Attention time and memory against sequence length on a GPU ({name})",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {name}; torch {meta['torch']}; bfloat16; wall time {meta['wall_s']:.0f} s; "
        "raw numbers in [claims.json](claims.json)",
        f"- one attention call of each kind on q, k, v of shape (1, h={len_cfg['h']}, n, "
        f"d={len_cfg['d']}), forward only, in `torch.inference_mode`; time: fastest of the "
        "repeats, CUDA-synchronised; peak memory: the CUDA caching allocator's peak of "
        "allocated bytes during the call above what was allocated before (output and "
        "temporaries, not the inputs). The CPU figures are in [../README.md](../README.md).",
        "",
        *length_section(length, cross, "Time (ms):", "{:.3f}"),
    ]
    (out / "README.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
