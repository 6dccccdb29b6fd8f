"""The training loss: label-smoothed cross-entropy over target tokens (Szegedy et al. 2016,
Section 7; Vaswani et al. 2017, Section 5.4), summed over the non-pad tokens of a batch.

``sequence_loss`` takes the logits a model's ``forward`` returns. ``projected_loss`` takes
the decoder features before the output projection instead (``forward(..., project=False)``)
and fuses the projection with the loss (as fused "linear cross-entropy" kernels do):

- only the rows of real target tokens are projected (padding rows never reach the
  (tokens x vocabulary) product);
- the rows go through in chunks of ``chunk_rows``, so the (N, V) logits, their
  log-softmax and its gradient never exist at once: per chunk, one exp pass gives the loss
  and the gradient softmax - (1 - eps) onehot(y) - eps / V, whose products with the weight
  and the features are the gradients of the features, the weight and the bias. The backward
  pass only scales these by the incoming gradient.

The matrix products are the same three as without fusion; what goes is the memory traffic
of materialising, normalising and differentiating the full logits, most of the 15% of a CPU
step that log-softmax took before (617 of 4,253 ms,
``results/bench/profile_cpu_before_fused_loss.md``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def sequence_loss(logits, tgt_out, pad_id: int, label_smoothing: float) -> torch.Tensor:
    """Summed label-smoothed cross-entropy over non-pad target tokens: logits (B, T, V)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    return F.cross_entropy(
        flat_logits,
        tgt_out.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


class _ProjectedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of ``hidden @ weight.T + bias``, chunk by chunk,
    with the gradients computed in the forward pass (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, eps, chunk_rows, dtype):
        N, V = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit here
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
            grad_b = torch.zeros(V, device=h.device, dtype=acc) if need_b else None
            total = torch.zeros((), device=h.device, dtype=acc)
            for start in range(0, N, chunk_rows):
                h_c, y = h[start : start + chunk_rows], target[start : start + chunk_rows, None]
                z = (h_c @ w.t() if b is None else torch.addmm(b, h_c, w.t())).to(acc)  # (C, V)
                z -= z.amax(dim=1, keepdim=True)  # shifted: exp cannot overflow
                z_y, z_mean = z.gather(1, y).squeeze(1), z.mean(dim=1)
                z.exp_()
                norm = z.sum(dim=1)  # (C,)
                lse = norm.log()
                total += ((1.0 - eps) * (lse - z_y) + eps * (lse - z_mean)).sum()
                if not (need_h or need_w or need_b):
                    continue
                z /= norm[:, None]  # softmax
                z -= eps / V
                z.scatter_add_(1, y, z.new_full(y.shape, eps - 1.0))  # d loss / d logits
                g = z.to(dtype)
                if need_h:
                    grad_h[start : start + chunk_rows] = g @ w
                if need_w and dtype == acc:
                    grad_w.addmm_(g.t(), h_c)
                elif need_w:
                    grad_w += (g.t() @ h_c).to(acc)
                if need_b:
                    grad_b += z.sum(dim=0)
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return *scaled, None, None, None, None


def eager_under_compile(fn):
    """``fn``, which torch.compile calls as it is instead of tracing into it: the
    ``torch.compiler.disable(fn)`` is made only when traced. As a decorator it imported
    torch._dynamo with this module: 1.5 of the 5.3 s that importing the trainer took, before
    train.py had read its config, so a bad setting took that much longer to be reported.
    (A run that trains imports it anyway, with the optimizer.)"""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


# Under torch.compile it runs eagerly, as one call: the real-token rows are a data-dependent
# shape and the chunk loop is Python, so tracing into it recompiled for every new token count.
@eager_under_compile
def projected_loss(
    hidden: torch.Tensor,
    out_proj: nn.Linear,
    tgt_out: torch.Tensor,
    pad_id: int,
    label_smoothing: float,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """``sequence_loss(out_proj(hidden), tgt_out, ...)``, fused (module docstring): hidden
    (B, T, D) decoder features, tgt_out (B, T). Under autocast the products run in its dtype
    and the softmax in float32, as with separate modules."""
    keep = tgt_out != pad_id
    rows, target = hidden[keep], tgt_out[keep]  # (N, D), (N,): real tokens only
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
    return _ProjectedCrossEntropy.apply(
        rows, out_proj.weight, out_proj.bias, target, label_smoothing, chunk_rows, dtype
    )
