"""Where the time of one training step goes: a torch.profiler breakdown.

    python bench/profile_step.py [--config transformer-base] [--max-tokens 25000]
        [--models ours,marian] [--compile] [--sdpa efficient] [--fused-loss true]
        [--device cpu] [--out results/bench/profile_NAME.md]

For each model, after warm-up on the same real Multi30k batches as ``bench/train_speed.py``,
profiles a few training steps and reports: wall time per step, GPU kernel time per step (the
time the GPU is busy; wall minus that is time the GPU waits for the host), kernel launches per
step, and the operators with the most host (CPU) time and the kernels with the most GPU time.
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

from train_speed import (  # noqa: E402
    CONFIGS,
    DROPOUT,
    MarianAdapter,
    add_malloc_option,
    apply_malloc,
    load_batches,
    make_step,
    marian,
)

from transformer.attention import use_sdpa_backends  # noqa: E402
from transformer.trainer import COMPILE_MODES  # noqa: E402
from transformer.transformer_model import Transformer  # noqa: E402


def table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="transformer-base", choices=list(CONFIGS))
    ap.add_argument("--max-tokens", type=int, default=25000)
    ap.add_argument("--models", default="ours,marian")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True) each")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode with --compile (trainer.compile_mode)",
    )
    ap.add_argument(
        "--sdpa", default="", help="only these SDPA kernels, e.g. efficient or cudnn+math"
    )
    ap.add_argument("--fused-loss", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_malloc_option(ap)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    sync = torch.cuda.synchronize if cuda else lambda: None
    reuse = apply_malloc(args.malloc, device)
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    mcfg = CONFIGS[args.config]
    sdpa = use_sdpa_backends(args.sdpa.split("+") if args.sdpa else None)
    batches, tok = load_batches(args.max_tokens, 4 + args.steps)
    batches = [b.to(device) for b in batches]
    V, pad = len(tok), tok.pad_id
    lines = [
        f"# Profile of one training step ({name})",
        "",
        f"- torch {torch.__version__}; {'bf16 autocast' if cuda else 'fp32'}; config {args.config} "
        f"({mcfg}); max tokens {args.max_tokens}; compile: "
        f"{args.compile and args.compile_mode}; "
        f"SDPA kernels allowed: {', '.join(sdpa)}"
        + ("" if cuda else f"; glibc malloc keeps freed memory for reuse: {reuse}"),
        f"- command: `python bench/profile_step.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    for mname in args.models.split(","):
        torch.manual_seed(0)
        if mname == "ours":
            model = Transformer(V, V, pad, **mcfg, **DROPOUT)
        else:
            model = MarianAdapter(marian(mcfg, V, pad, tok.bos_id, tok.eos_id))
        model = model.to(device)
        fused = mname == "ours" and (
            args.fused_loss == "true" or (args.fused_loss == "auto" and not cuda)
        )  # as trainer.fused_loss
        step = make_step(model, pad, device, precision, args.compile and args.compile_mode, fused)
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
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        launch_ops = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_ops)
        n = len(timed)
        tokens = sum(int((b.tgt_out != pad).sum()) for b in timed) / n
        lines += [
            f"## {mname}",
            "",
            f"- wall per step: {1000 * wall:.1f} ms for {tokens:,.0f} target tokens "
            "(profiled; the profiler adds host overhead)",
            f"- output projection fused into the loss (`trainer.fused_loss`): {fused}",
        ]
        if cuda:
            lines += [
                f"- GPU kernel time per step: {gpu_us / n / 1000:.1f} ms "
                f"({100 * gpu_us / n / 1e6 / wall:.0f}% of wall: "
                "the rest the GPU waits for the host)",
                f"- kernel launches per step: {launches / n:.0f}",
            ]
        lines += ["", "Host time by operator (self CPU, per step):", ""]
        cpu = sorted(
            (e for e in events if e.device_type.name == "CPU"),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )[: args.top]
        lines += table(
            [(e.key[:60], e.count // n, f"{e.self_cpu_time_total / n / 1000:.2f}") for e in cpu],
            ["operator", "calls/step", "self CPU ms/step"],
        )
        if cuda:
            lines += ["", "GPU time by kernel (per step):", ""]
            gpu = sorted(
                (e for e in events if e.device_type.name == "CUDA"),
                key=lambda e: e.self_device_time_total,
                reverse=True,
            )[: args.top]
            rows = [
                (e.key[:70], e.count // n, f"{e.self_device_time_total / n / 1000:.2f}")
                for e in gpu
            ]
            lines += table(rows, ["kernel", "calls/step", "GPU ms/step"])
        lines.append("")
        print("\n".join(lines[-40:]), flush=True)
        del model, step
        if cuda:
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
