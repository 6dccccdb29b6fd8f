"""Where the time of one training step goes: a torch.profiler breakdown.

    python bench/profile_step.py [--config transformer-base] [--max-tokens 25000]
        [--models ours,marian,ours/bf16-weights] [--compile] [--sdpa efficient] [--fused-loss true]
        [--join 1] [--device cpu] [--out results/bench/profile_NAME.md]

For each model, after warm-up on the same real Multi30k batches as ``bench/train_speed.py``,
profiles a few training steps and reports: wall time per step, GPU kernel time per step (the
time the GPU is busy; wall minus that is time the GPU waits for the host), kernel launches per
step, GPU time by kind of kernel (matrix products, attention, layer norm, dropout, casts, ...)
with the rate in TFLOP/s of the matrix products and of attention over their own kernel time
(where the MFU of ``bench/train_speed.py`` goes), and the operators with the most host (CPU)
time and the kernels with the most GPU time. ``ours/bf16-weights`` is ours with
``trainer.precision=bf16-weights`` (transformer/precision.py); ``ours/rows-W`` is ours on the
same batches laid out several pairs to a row of W slots (``trainer.packed_rows=W``,
transformer/packing.py; its TFLOP/s count the padded batches' FLOPs, as for the others).
Each model's section is saved as soon as it is measured.
On a CPU (``--device cpu``, fp32): wall time per step and the operators with the most time.
Not a test: it measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import (  # noqa: E402
    CONFIGS,
    add_join_option,
    add_malloc_option,
    apply_malloc,
    batches_said,
    build_model,
    flops_by_part,
    load_checked,
    machine,
    make_step,
    on_device,
)

from transformer.attention import use_sdpa_backends  # noqa: E402
from transformer.settings import COMPILE_MODES  # noqa: E402

# Kinds of GPU kernel, told apart by fragments of their lower-cased names; the first match
# wins, so that e.g. the memory-efficient attention's "fmha_cutlass" kernels are attention and
# torch.compile's Triton fusions are one kind whatever operators they fused.
KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "splitk", "triton_tem")),
    ("fused by torch.compile (Triton)", ("triton",)),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta")),
    ("dropout", ("dropout", "bernoulli", "philox")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy")),
    ("optimizer and gradient clipping", ("multi_tensor", "adam")),
    ("embedding and indexing", ("embedding", "index")),
    ("casts and copies", ("copy", "catarray", "memset", "memcpy")),
    ("reductions (bias gradients, sums)", ("reduce_kernel",)),
    ("other elementwise", ("elementwise",)),
)


def kernel_kind(name: str) -> str:
    """The kind (``KERNEL_KINDS``) of a GPU kernel by its profiler name; "other" if none."""
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kinds_table(kernels, n: int, flops: dict[str, float]) -> list[str]:
    """GPU time per step by kind of kernel, with the rate of the matrix products and of
    attention in TFLOP/s (``flops``: FLOPs per step by part, as ``flops_by_part``).
    ``kernels``: (name, calls, GPU microseconds) over ``n`` steps."""
    by_kind: dict[str, list[float]] = {}
    for name, calls, us in kernels:
        acc = by_kind.setdefault(kernel_kind(name), [0, 0.0])
        acc[0] += calls
        acc[1] += us
    total = sum(us for _, us in by_kind.values()) or 1.0
    counted = {"matrix products": flops["linear"], "attention": flops["attention"]}
    rows = []
    for kind, (calls, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        rate = counted.get(kind)
        rate = f"{rate / (us / n / 1e6) / 1e12:.0f}" if rate and us else "-"
        rows.append((kind, f"{calls / n:.0f}", f"{us / n / 1000:.2f}", f"{100 * us / total:.0f}%",
                     rate))  # fmt: skip
    return table(rows, ["kind", "kernels/step", "GPU ms/step", "share", "TFLOP/s"])


def top_table(events, device: str, n: int, top: int, width: int, what: str) -> list[str]:
    """The ``top`` events of ``device`` (CPU or CUDA) by self time, per step over ``n`` steps."""
    attr = "self_cpu_time_total" if device == "CPU" else "self_device_time_total"
    chosen = sorted(
        (e for e in events if e.device_type.name == device),
        key=lambda e: getattr(e, attr),
        reverse=True,
    )[:top]
    rows = [(e.key[:width], e.count // n, f"{getattr(e, attr) / n / 1000:.2f}") for e in chosen]
    unit = "self CPU ms/step" if device == "CPU" else "GPU ms/step"
    return table(rows, [what, "calls/step", unit])


MODELS = ("ours", "marian", "ours/bf16-weights")  # and ours/rows-W[/bf16-weights]
ROWS = "ours/rows-"
BF16W = "/bf16-weights"


def rows_width(name: str) -> int | None:
    """W of ours/rows-W or ours/rows-W/bf16-weights (W >= 1), else None."""
    width = name.removeprefix(ROWS).removesuffix(BF16W)
    if name.startswith(ROWS) and width.isascii() and width.isdigit() and int(width) >= 1:
        return int(width)
    return None


def model_names(text: str) -> list[str]:
    """``--models``: comma-separated, each of ``MODELS`` or ours/rows-W[/bf16-weights]
    (W >= 1). Another name was profiled as Marian (or, ours/bf16-weight, as plain ours)
    under that name."""
    chosen = arguments.items(text)
    for name in chosen:
        if name in MODELS or rows_width(name):
            continue
        raise arguments.Invalid(
            f"unknown model {name!r}; use {', '.join(MODELS)} or {ROWS}W[{BF16W}] (W a width >= 1)"
        )
    return chosen


def table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def make_parser() -> argparse.ArgumentParser:
    """The options; each value is checked as it is parsed (bench/arguments.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="transformer-base", choices=list(CONFIGS))
    ap.add_argument("--max-tokens", type=arguments.count(1), default=25000)
    ap.add_argument(
        "--models",
        type=model_names,
        default="ours,marian",
        help="of ours, marian, ours/bf16-weights, ours/rows-W (the batches in packed rows of "
        "W slots: trainer.packed_rows=W), ours/rows-W/bf16-weights (both)",
    )
    ap.add_argument("--steps", type=arguments.count(1), default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True) each")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode with --compile (trainer.compile_mode)",
    )
    ap.add_argument(
        "--sdpa",
        type=arguments.sdpa_setting,
        default="",
        help="only these SDPA kernels, e.g. efficient or cudnn+math (of "
        "flash, efficient, cudnn, math)",
    )
    ap.add_argument("--fused-loss", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--top", type=arguments.count(1), default=12)
    ap.add_argument(
        "--device", type=arguments.device, default="auto", help="auto, cpu, cuda or cuda:N"
    )
    add_join_option(ap)
    add_malloc_option(ap)
    ap.add_argument("--out", type=arguments.out_file, help="the report's file (not a folder)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = make_parser()
    args = ap.parse_args(argv)
    device = args.device
    host_batches, tok = load_checked(ap, args.max_tokens, 4 + args.steps, args.join)
    cuda = device.type == "cuda"
    reuse = apply_malloc(args.malloc, device)
    name = machine(device) + ("" if cuda else f", {torch.get_num_threads()} threads")
    mcfg = CONFIGS[args.config]
    sdpa = use_sdpa_backends(args.sdpa.split("+") if args.sdpa else None, device)
    lines = [
        f"# Profile of one training step ({name})",
        "",
        f"- torch {torch.__version__}; {'bf16 autocast' if cuda else 'fp32'}; config {args.config} "
        f"({mcfg}); max tokens {args.max_tokens}; compile: "
        f"{args.compile and args.compile_mode}; "
        f"SDPA kernels allowed: {', '.join(sdpa)}"
        + ("" if cuda else f"; glibc malloc keeps freed memory for reuse: {reuse}"),
        f"- batches: {batches_said(args.join)}",
        f"- command: `python bench/profile_step.py {arguments.given(argv)}`",
        "",
    ]
    for mname in args.models:
        try:
            lines += profile_model(mname, args, host_batches, tok)
            print("\n".join(lines[-40:]), flush=True)
        except Exception as e:  # a compiler or kernel error: the other models still run
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"{mname}: failed: {type(e).__name__}: {first}", flush=True)
            lines += [f"## {mname}", "", f"- failed: {type(e).__name__}: {first}", ""]
        if cuda:
            torch.cuda.empty_cache()
        arguments.save(args.out, lines, done=False)  # kept if a later model runs out of time
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


def profile_model(mname: str, args, host_batches, tok) -> list[str]:
    """The report's section on model ``mname``: after a warm-up over every batch, the
    last ``--steps`` batches profiled; wall time, and host time by operator, and on CUDA
    GPU time, kernel launches, GPU time by kind of kernel and by kernel."""
    device, mcfg, pad = args.device, CONFIGS[args.config], tok.pad_id
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.manual_seed(0)
    base = mname.split("/")[0]
    model = build_model(base, mcfg, len(tok), pad, tok.bos_id, tok.eos_id).to(device)
    fused = base == "ours" and (
        args.fused_loss == "true" or (args.fused_loss == "auto" and not cuda)
    )  # as trainer.fused_loss
    prec = "bf16-weights" if mname.endswith(BF16W) else ("bf16" if cuda else "fp32")
    step = make_step(model, pad, device, prec, args.compile and args.compile_mode, fused)
    width = rows_width(mname)  # FLOPs below: of the padded batches, as for all
    host_lengths = getattr(model, "takes_src_lengths", False)
    batches = [on_device(b, device, pad, width, host_lengths) for b in host_batches]
    for b in batches:  # warm-up, every shape once (compilation included)
        step(b)
    sync()
    timed = batches[-args.steps :]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        sync()
        wall = (time.perf_counter() - t0) / len(timed)
    events = prof.key_averages()
    n = len(timed)
    tokens = sum(int((b.tgt_out != pad).sum()) for b in timed) / n
    lines = [
        f"## {mname}",
        "",
        f"- wall per step: {1000 * wall:.1f} ms for {tokens:,.0f} target tokens "
        "(profiled; the profiler adds host overhead)",
        f"- output projection fused into the loss (`trainer.fused_loss`): {fused}; "
        f"precision: {prec}",
    ]
    if cuda:
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        # cuLaunchKernelEx launches cuBLASLt's matrix products (nvjet_*): 363 a step of
        # Transformer-base, left out of the counts before 2026-12-03
        launch_ops = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                      "cuLaunchKernelEx")  # fmt: skip
        launches = sum(e.count for e in events if e.key in launch_ops)
        lines += [
            f"- GPU kernel time per step: {gpu_us / n / 1000:.1f} ms "
            f"({100 * gpu_us / n / 1e6 / wall:.0f}% of wall: "
            "the rest the GPU waits for the host)",
            f"- kernel launches per step: {launches / n:.0f}",
        ]
    lines += ["", "Host time by operator (self CPU, per step):", ""]
    lines += top_table(events, "CPU", n, args.top, 60, "operator")
    if cuda:
        counted = host_batches[-args.steps :]  # their shapes
        V = len(tok)
        parts = [flops_by_part(mcfg, *b.src.shape, b.tgt_in.shape[1], V) for b in counted]
        per_step = {k: sum(p[k] for p in parts) / n for k in ("linear", "attention")}
        kernels = [
            (e.key, e.count, e.self_device_time_total)
            for e in events
            if e.device_type.name == "CUDA"
        ]
        lines += [
            "",
            "GPU time by kind of kernel (per step; TFLOP/s: the matrix FLOPs that "
            "`bench/train_speed.py` counts for MFU, weights' products and attention's "
            "apart, over those kernels' own time):",
            "",
        ]
        lines += kinds_table(kernels, n, per_step)
        lines += ["", "GPU time by kernel (per step):", ""]
        lines += top_table(events, "CUDA", n, args.top, 70, "kernel")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
