"""Attention kernels on Multi30k's batch shapes: what each of a step's attention calls costs.

    python bench/attention_kernels.py [--config transformer-base] [--max-tokens 25000]
        [--batches 4] [--repeats 10] [--device cuda] [--out results/bench/NAME.md]

On an H100 the cuDNN attention kernel torch picked took 20.6 of the 67.8 ms of GPU time of a
Transformer-base step at 25k tokens (results/bench/profile_h100_eager.md): Multi30k's
sentences are 10-30 tokens long, so a batch is ~1,900 short sequences, and a kernel tiled for
long sequences spends most of each tile on nothing. This bench takes the real, length-bucketed
Multi30k batches of ``bench/train_speed.py`` and times the forward and backward pass of one
attention call of each of the step's three kinds, with the model's head layout and masks,
bf16 on a GPU:

- encoder self-attention (the source's additive key mask, ``attention.key_bias``),
- decoder self-attention (causal, SDPA's own flag, no mask),
- cross-attention (target queries, source keys, the source's key mask),

through ``F.scaled_dot_product_attention`` restricted to one kernel at a time (``cudnn``,
``efficient``, ``flash``, ``math``; flash takes no mask, so it runs the causal call only), and
on the real tokens only, packed, with no mask at all (what a model would gain from never
computing on padding), all three counting the gather from the padded layout and the
scatter back that a model keeping padded activations needs:

- ``nested flash``, ``nested efficient``: SDPA over nested (jagged) tensors, which torch
  runs with that kernel's variable-length form, dropout included; not for causal calls
  (torch does not take ``is_causal`` with nested tensors; flash takes those padded);
- ``varlen``: the variable-length FlashAttention kernel
  (``torch.nn.attention.varlen.varlen_attn``), which has no dropout; ``varlen (kernel)``:
  the same on leaves packed beforehand, the kernel alone;
- ``flash (unmasked)``: flash on the padded shapes with no key mask: what the calls would
  cost if no batch padded its sources (batches of one source length), the mask being what
  keeps flash from taking them.
- ``rows W cudnn``, ``rows W efficient`` (W = 128, 256), ``rows 128 math``: the batch's
  sentence pairs laid out several to a row of W slots (``transformer/packing.py``, as
  ``trainer.packed_rows=W`` lays them out), each query seeing only its own sentence through a
  block-diagonal mask (``segment_bias``), on leaves packed beforehand (the kernel alone, as
  a model run on packed rows throughout would call it): a tile of queries then holds
  several sentences, not one and padding.

Every kernel's output is first checked against the math kernel in fp32 on the real
positions. Per step: each call times its layers (encoder self x encoder layers, the other
two x decoder layers). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402
from train_speed import CONFIGS, load_checked, machine  # noqa: E402

from transformer.attention import key_bias, padding_mask  # noqa: E402
from transformer.packing import pack_lengths, segment_bias  # noqa: E402

SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
}
KINDS = ("encoder self", "decoder self", "cross")
UNMASKED = "flash (unmasked)"  # the flash kernel on the same shapes without the key mask
ROW_WIDTHS = (128, 256)  # of the packed-rows methods timed by default (the header's shapes)
METHODS = ("cudnn", "efficient", "flash", "math", "nested flash", "nested efficient", "varlen",
           "varlen (kernel)", UNMASKED, "rows 128 cudnn", "rows 256 cudnn", "rows 128 efficient",
           "rows 256 efficient", "rows 128 math")  # fmt: skip
DROPOUTS = (0.0, 0.1)  # attention dropout: none, and the benchmarks' (train_speed.DROPOUT)
TOLERANCE = 3e-2  # bf16 against fp32, outputs of unit scale


class Rows(NamedTuple):
    """A call's leaves in packed rows (``Call.pack_rows``)."""

    leaves: list  # q, k, v (R, W, h, d), leaves of their own
    bias: torch.Tensor  # the block-diagonal mask (segment_bias)
    q_side: object  # packing.PackedSide of the queries, to unpack the output
    grad: torch.Tensor  # the output's gradient, packed


def rows_method(method: str) -> tuple[int, str] | None:
    """``rows W kernel`` -> (W, kernel); None for another method."""
    parts = method.split()
    if len(parts) == 3 and parts[0] == "rows" and parts[1].isdigit() and parts[2] in SDPA:
        return int(parts[1]), parts[2]
    return None


def method_names(text: str) -> list[str]:
    """``--methods``: comma-separated, each of ``METHODS`` or rows W KERNEL (W >= 1, a kernel
    of ``SDPA``); another name failed after the methods listed before it were timed."""
    chosen = arguments.items(text)
    for method in chosen:
        rows = rows_method(method)
        if method not in METHODS and not (rows and rows[0] >= 1):
            raise arguments.Invalid(
                f"unknown method {method!r}; use {', '.join(METHODS)}, or rows W KERNEL "
                f"(W >= 1; KERNEL one of {', '.join(SDPA)})"
            )
    return chosen


def packing(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For sequences of ``lengths`` left-aligned in rows of ``width``: the flat positions of
    their tokens in the (B * width) padded layout, the cumulative lengths (B + 1, int32,
    starting at 0) that variable-length kernels take, and the longest length."""
    B = len(lengths)
    real = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    index = torch.arange(B * width, device=lengths.device)[real.flatten()]
    cu = torch.zeros(B + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return index, cu, int(lengths.max())


def pack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, h, d) padded -> (tokens, h, d), the tokens at flat positions ``index``."""
    B, L, h, d = x.shape
    return x.reshape(B * L, h, d).index_select(0, index)


def unpack(x: torch.Tensor, index: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """(tokens, h, d) -> (B, L, h, d), zeros at the padding."""
    return x.new_zeros(B * L, *x.shape[1:]).index_copy(0, index, x).view(B, L, *x.shape[1:])


@functools.cache
def _says_causal_as_window(varlen_attn) -> bool:
    """torch 2.13's varlen_attn says causal as a window (left, right), 2.10's as is_causal;
    read once per function, not in every timed call."""
    return "window_size" in inspect.signature(varlen_attn).parameters


def causal_argument(varlen_attn, causal: bool) -> dict:
    if _says_causal_as_window(varlen_attn):
        return {"window_size": (-1, 0) if causal else (-1, -1)}
    return {"is_causal": causal}


class Call:
    """One attention call of a step on one batch: the padded (B, L, h, d) leaves (as a
    projection makes them; SDPA gets them transposed to (B, h, L, d), as in the model), the
    additive key mask, the causal flag, and the packing of the real tokens."""

    def __init__(self, kind, batch, pad, h, d, dtype, device):
        src_len = batch.src_mask.sum(1).to(device)
        tgt_len = (batch.tgt_out != pad).sum(1).to(device)
        B, S, T = batch.src.shape[0], batch.src.shape[1], batch.tgt_in.shape[1]
        Lq, Lk, len_q, len_k = {
            "encoder self": (S, S, src_len, src_len),
            "decoder self": (T, T, tgt_len, tgt_len),
            "cross": (T, S, tgt_len, src_len),
        }[kind]
        self.B, self.Lq, self.causal = B, Lq, kind == "decoder self"
        g = torch.Generator(device="cpu").manual_seed(0)

        def leaf(L):
            return torch.randn(B, L, h, d, generator=g).to(device, dtype).requires_grad_()

        self.q, self.k, self.v = leaf(Lq), leaf(Lk), leaf(Lk)
        self.grad = torch.randn(B, Lq, h, d, generator=g).to(device, dtype)
        mask = padding_mask(batch.src_mask.to(device))
        self.mask = None if self.causal else key_bias(mask, dtype)
        self.index_q, self.cu_q, self.max_q = packing(len_q, Lq)
        self.real_q = (torch.arange(Lq, device=device) < len_q[:, None])[:, :, None, None]
        self.index_k, self.cu_k, self.max_k = packing(len_k, Lk)
        self.tokens = len(self.index_q)
        self.lengths = (src_len, tgt_len, S, T, kind)
        self.rows: dict[int, Rows] = {}  # by width (``pack_rows``)

    def pack_rows(self, width: int) -> None:
        """The leaves laid out in packed rows of ``width`` slots, with their block-diagonal
        mask and the query side's packing (to unpack the output)."""
        if width in self.rows:
            return
        src_len, tgt_len, S, T, kind = self.lengths
        src, tgt = pack_lengths(src_len.cpu(), tgt_len.cpu(), width, S, T, self.q.device)
        q_side, k_side = {"encoder self": (src, src), "decoder self": (tgt, tgt),
                          "cross": (tgt, src)}[kind]  # fmt: skip
        with torch.no_grad():
            leaves = [q_side.pack(self.q), k_side.pack(self.k), k_side.pack(self.v)]
        bias = segment_bias(q_side.segment, k_side.segment, self.causal, self.q.dtype)
        leaves = [x.detach().requires_grad_() for x in leaves]
        self.rows[width] = Rows(leaves, bias, q_side, q_side.pack(self.grad))

    def packed_rows(self, width: int, dropout: float):
        """SDPA over the packed rows of ``width`` (R, W, h, d), the segment mask."""
        rows = self.rows[width]
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in rows.leaves), attn_mask=rows.bias, dropout_p=dropout
        )
        return out.transpose(1, 2)

    def sdpa(self, dropout: float, q=None, k=None, v=None, masked: bool = True):
        """SDPA on the padded layout; without ``masked``, no key mask (every key real)."""
        if q is None:
            q, k, v = self.q, self.k, self.v
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        mask = self.mask if masked and self.mask is not None else None
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=self.causal
        )
        return out.transpose(1, 2)

    def nested(self, dropout: float):
        """SDPA over nested (jagged) tensors of the real tokens, packed here and the output
        unpacked: torch runs a variable-length kernel, with dropout (not causal calls)."""
        nest = torch.nested.nested_tensor_from_jagged
        q = nest(pack(self.q, self.index_q), self.cu_q.long(), max_seqlen=self.max_q)
        k, v = (nest(pack(x, self.index_k), self.cu_k.long(), max_seqlen=self.max_k)
                for x in (self.k, self.v))  # fmt: skip
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), dropout_p=dropout, is_causal=self.causal
        )
        return unpack(out.transpose(1, 2).values(), self.index_q, self.B, self.Lq)

    def varlen(self, packed_leaves: bool = False):
        """varlen_attn over the real tokens; with ``packed_leaves`` the leaves are packed
        already (the kernel alone), else they are packed and the output unpacked here."""
        from torch.nn.attention.varlen import varlen_attn

        if packed_leaves:
            q, k, v = self.packed
        else:
            q = pack(self.q, self.index_q)
            k, v = pack(self.k, self.index_k), pack(self.v, self.index_k)
        causal = causal_argument(varlen_attn, self.causal)
        out = varlen_attn(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, **causal)
        return out if packed_leaves else unpack(out, self.index_q, self.B, self.Lq)

    def pack_leaves(self) -> None:
        with torch.no_grad():
            q = pack(self.q, self.index_q)
            k, v = pack(self.k, self.index_k), pack(self.v, self.index_k)
        self.packed = [x.detach().requires_grad_() for x in (q, k, v)]
        self.packed_grad = pack(self.grad, self.index_q)

    def reference(self, masked: bool = True) -> torch.Tensor:
        """The math kernel in fp32, padded (B, Lq, h, d)."""
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            f = [x.float() for x in (self.q, self.k, self.v)]
            return self.sdpa(0.0, *f, masked=masked)


def run(call: Call, method: str, dropout: float):
    """One forward pass of ``method`` on ``call``: (output, gradient to feed backward)."""
    if method == "varlen":
        return call.varlen(), call.grad
    if method == "varlen (kernel)":
        return call.varlen(packed_leaves=True), call.packed_grad
    if method.startswith("nested "):
        with sdpa_kernel([SDPA[method.removeprefix("nested ")]]):
            return call.nested(dropout), call.grad
    if rows_method(method):
        width, kernel = rows_method(method)
        call.pack_rows(width)
        with sdpa_kernel([SDPA[kernel]]):
            return call.packed_rows(width, dropout), call.rows[width].grad
    if method == UNMASKED:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return call.sdpa(dropout, masked=False), call.grad
    with sdpa_kernel([SDPA[method]]):
        return call.sdpa(dropout), call.grad


def check(call: Call, method: str) -> float:
    """Largest difference from the fp32 math kernel, padded, on the real query positions."""
    with torch.no_grad():
        out, _ = run(call, method, 0.0)
    if method == "varlen (kernel)":
        out = unpack(out, call.index_q, call.B, call.Lq)
    if rows_method(method):
        out = call.rows[rows_method(method)[0]].q_side.unpack(out, call.B, call.Lq)
    diff = (out.float() - call.reference(masked=method != UNMASKED)).abs()
    return float(torch.where(call.real_q, diff, 0.0).max())


def rows_shapes(batches, pad: int) -> str:
    """Each row width's packed shapes of the batches, and the share of slots holding tokens."""
    parts = []
    for width in ROW_WIDTHS:
        shapes, slots, tokens = [], 0, 0
        for b in batches:
            src_len, tgt_len = b.src_mask.sum(1), (b.tgt_out != pad).sum(1)
            src, tgt = pack_lengths(src_len, tgt_len, width, b.src.shape[1], b.tgt_in.shape[1])
            shapes.append(f"{src.shape}->{tgt.shape}")
            slots += src.segment.numel() + tgt.segment.numel()
            tokens += int(src_len.sum() + tgt_len.sum())
        parts.append(f"width {width}: {', '.join(shapes)}, {100 * tokens / slots:.0f}% of "
                     "the slots hold tokens")  # fmt: skip
    return "; ".join(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(call: Call, method: str, dropout: float, repeats: int, device) -> float:
    """Median seconds of a forward and backward pass (after two untimed ones)."""
    leaves = (call.q, call.k, call.v)
    if method == "varlen (kernel)":
        leaves = call.packed
    elif rows_method(method):
        leaves = call.rows[rows_method(method)[0]].leaves
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        out, grad = run(call, method, dropout)
        out.backward(grad)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        for x in leaves:
            x.grad = None
    return statistics.median(times)


def worst_difference(calls: list[Call], method: str) -> float:
    return max(check(c, method) for c in calls)


def mean_ms(calls: list[Call], method: str, dropout: float, repeats: int, device) -> float:
    """Milliseconds of a call's forward and backward pass, averaged over the batches."""
    return statistics.mean(1000 * time_call(c, method, dropout, repeats, device) for c in calls)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", type=arguments.device, default="auto")
    ap.add_argument("--config", default="transformer-base", choices=list(CONFIGS))
    ap.add_argument("--max-tokens", type=arguments.count(1), default=25000)
    ap.add_argument(
        "--batches", type=arguments.count(1), default=4, help="the first N batches of epoch 0"
    )
    ap.add_argument("--repeats", type=arguments.count(1), default=10)
    ap.add_argument("--methods", type=method_names, default=",".join(METHODS))
    ap.add_argument("--out", type=arguments.out_file)
    args = ap.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = CONFIGS[args.config]
    h, d = cfg["n_heads"], cfg["d_model"] // cfg["n_heads"]
    layers = {"encoder self": cfg["n_enc_layers"], "decoder self": cfg["n_dec_layers"],
              "cross": cfg["n_dec_layers"]}  # fmt: skip
    methods = args.methods
    batches, tok = load_checked(ap, args.max_tokens, args.batches)
    shapes = ", ".join(f"{tuple(b.src.shape)}->{tuple(b.tgt_in.shape)}" for b in batches)
    real = sum(int(b.src_mask.sum()) for b in batches) / sum(b.src.numel() for b in batches)
    lines = [
        f"# Attention kernels on Multi30k batches ({machine(device)})",
        "",
        f"- device: {machine(device)}; torch {torch.__version__}; {str(dtype).split('.')[-1]}",
        f"- command: `python bench/attention_kernels.py {arguments.given(argv)}`",
        f"- config {args.config} ({h} heads of {d}; {layers['encoder self']}+"
        f"{layers['cross']} layers); max tokens {args.max_tokens}; the first {len(batches)} "
        f"batches of epoch 0, (B, S)->(B, T): {shapes}; {100 * real:.0f}% of the source "
        "positions are real tokens",
        "- packed rows, (R, W source)->(R, W target) per batch: "
        + rows_shapes(batches, tok.pad_id),
        f"- ms: forward + backward of one call, wall time with its host work (synchronised "
        f"after each pass), median of {args.repeats} after 2 untimed, averaged over the "
        "batches; 'n/a': the kernel does not take the call (the reason "
        "below); '-': varlen_attn has no dropout",
        "",
        "| attention | kernel | max diff vs fp32 | ms, dropout 0 | ms, dropout 0.1 |",
        "|---|---|---:|---:|---:|",
    ]
    reasons, per_step = {}, {(m, p): {} for m in methods for p in DROPOUTS}

    def attempt(what, fn, *args):
        """fn(*args), or None with the first line of why the kernel did not take the call."""
        try:
            return fn(*args)
        except (RuntimeError, ImportError, NotImplementedError) as e:
            reasons[what] = str(e).strip().splitlines()[0][:200]
            return None

    for kind in KINDS:
        calls = [Call(kind, b, tok.pad_id, h, d, dtype, device) for b in batches]
        for method in methods:
            if method == "varlen (kernel)":
                attempt((method, kind, "packing"), lambda cs: [c.pack_leaves() for c in cs], calls)
            diff = attempt((method, kind, "check"), worst_difference, calls, method)
            cells = ["n/a" if diff is None else f"{diff:.1e}" + " (WRONG)" * (diff > TOLERANCE)]
            for p in DROPOUTS:
                ms = None
                if diff is not None and not (p and method.startswith("varlen")):
                    what = (method, kind, f"dropout {p}")
                    ms = attempt(what, mean_ms, calls, method, p, args.repeats, device)
                cells.append("-" if p and method.startswith("varlen") else
                             "n/a" if ms is None else f"{ms:.3f}")  # fmt: skip
                if ms is not None:
                    per_step[method, p][kind] = ms * layers[kind]
            lines.append(f"| {kind} | {method} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)
            arguments.save(args.out, lines, done=False)
    lines += ["", "Attention per step: each kind's call times its layers, summed over the kinds "
              "the kernel takes (those it does not are named):", ""]  # fmt: skip
    lines += ["| kernel | ms, dropout 0 | ms, dropout 0.1 |", "|---|---:|---:|"]
    for m in methods:
        cells = []
        for p in DROPOUTS:
            got = per_step[m, p]
            missing = [k for k in KINDS if k not in got]
            cells.append("-" if p and m.startswith("varlen") else "n/a" if not got else
                         f"{sum(got.values()):.2f}" + (f" (without {', '.join(missing)})"
                                                       if missing else ""))  # fmt: skip
        lines.append(f"| {m} | {' | '.join(cells)} |")
    if reasons:
        lines += ["", "Not taken (the error's first line):", ""]
        lines += [f"- {m}, {k}, {w}: {r}" for (m, k, w), r in reasons.items()]
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
