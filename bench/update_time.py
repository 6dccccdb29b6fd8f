"""Host time of the parts of an update after the backward pass, per update, on the CPU:
gradient clipping, dropping gradients, and the optimizer's step.

    python bench/update_time.py [--out results/bench/update_time_cpu.md]

With ``trainer.precision=bf16-weights`` the fp32 parameters and their gradients are views of
one flat buffer each (transformer/precision.py), so the trainer

- clips the gradients with one norm and one scaling of the flat buffer
  (``Bf16Weights.clip_grad_norm_``) instead of ``torch.nn.utils.clip_grad_norm_``,
- drops the bf16 copy's gradients with a loop over its listed parameters instead of
  ``Module.zero_grad``, which walks the module tree, and
- lets fused AdamW update the flat buffer as one parameter (``Bf16Weights.params_for``)
  instead of each parameter,

each of which saves per-tensor work in Python: host time that a launch-bound GPU step waits
for. This times each way at each config's depth and width 32 (as ``bench/host_overhead.py``),
after a real backward pass each time, the ways alternating in rounds. Not a test: it
measures.
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
from host_overhead import build, tiny_batch  # noqa: E402
from train_speed import CONFIGS, machine  # noqa: E402

from transformer.precision import Bf16Weights  # noqa: E402


def ways(model, mixed):
    """name -> (what runs before the timed call, the timed call)."""
    params = list(model.parameters())
    # as the trainer: fused, told by a flag on the device whether to skip the update; the
    # flat one first, so that gather_grads hands out the flat gradient too
    flat = torch.optim.AdamW(mixed.params_for(torch.optim.AdamW), lr=1e-6, fused=True)
    each = torch.optim.AdamW(params, lr=1e-6, fused=True)
    for optimizer in (flat, each):
        optimizer.found_inf = torch.zeros(())

    def optimizer_update(optimizer):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def gathered():
        mixed.gather_grads()

    def nothing():
        """The copy keeps the backward pass's gradients, for the timed call to drop."""

    return {
        "clip: torch clip_grad_norm_(model.parameters())": (
            gathered,
            lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
        ),
        "clip: torch clip_grad_norm_(listed parameters)": (
            gathered,
            lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        ),
        "clip: Bf16Weights.clip_grad_norm_ (flat buffer)": (
            gathered,
            lambda: mixed.clip_grad_norm_(1.0),
        ),
        "step: fused AdamW over each parameter, then its zero_grad": (
            gathered,
            lambda: optimizer_update(each),
        ),
        "step: fused AdamW over the flat buffer, then its zero_grad": (
            gathered,
            lambda: optimizer_update(flat),
        ),
        "drop the copy's gradients: Module.zero_grad(set_to_none=True)": (
            nothing,
            lambda: mixed.compute.zero_grad(set_to_none=True),
        ),
        "drop the copy's gradients: loop over the listed parameters": (
            nothing,
            lambda: [setattr(p, "grad", None) for p in mixed.compute_params],
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=arguments.names(CONFIGS), default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=arguments.count(1), default=5)
    ap.add_argument(
        "--calls", type=arguments.count(1), default=40, help="timed calls per way and round"
    )
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    lines = [
        f"# Host time of the update after the backward pass ({machine(torch.device('cpu'))}, "
        f"{torch.get_num_threads()} threads)",
        "",
        f"- torch {torch.__version__}; command: `python bench/update_time.py "
        f"{arguments.given(argv)}`",
        "- our Transformer at each config's depth, width 32 (d_ff 64, vocabulary 64), "
        "`trainer.precision=bf16-weights` (transformer/precision.py); before each timed call "
        "a forward and backward pass on a 2 x 5-token batch (and for clipping, the gather "
        "of the gradients into the fp32 buffer); each way runs once untimed first (the "
        "optimizers make their state)",
        f"- ms per call: median over {args.rounds} rounds x {args.calls} calls, the ways "
        "alternating by round",
        "",
        "| config | way | ms per call |",
        "|---|---|---:|",
    ]
    batch = tiny_batch(64)
    for cname in args.configs:
        model = build("ours", CONFIGS[cname] | {"d_model": 32, "d_ff": 64}, 64)
        mixed = Bf16Weights(model)
        net = mixed.compute.train()
        timed = ways(model, mixed)
        times = {name: [] for name in timed}
        for warm_up, calls in [(True, 1)] + [(False, args.calls)] * args.rounds:
            for name, (prepare, call) in timed.items():
                for _ in range(calls):
                    net(batch.src, batch.src_mask, batch.tgt_in).float().square().mean().backward()
                    prepare()
                    t0 = time.perf_counter()
                    call()
                    if not warm_up:
                        times[name].append(time.perf_counter() - t0)
                    for p in [*mixed.compute_params, *model.parameters(), mixed.flat_param]:
                        p.grad = None
        for name, ts in times.items():
            lines.append(f"| {cname} | {name} | {1000 * statistics.median(ts):.3f} |")
            print(lines[-1], flush=True)
        arguments.save(args.out, lines, done=False)
    arguments.save(args.out, lines, done=True)


if __name__ == "__main__":
    main()
