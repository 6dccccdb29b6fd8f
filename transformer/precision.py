"""``trainer.precision=bf16-weights``: the training forward and backward run on a bf16 copy
of the model, without autocast; the optimizer updates the fp32 model.

Under autocast (``precision=bf16``) each fp32 weight is cast to bf16 in the forward pass and
its gradient back to fp32 in the backward pass: on a GPU that is one kernel launch per
weight and pass, and the small models' steps are bound by launches, not by arithmetic
(``results/bench/host_overhead_cpu.md`` counts the operators). Here the weights are bf16
already, so nothing is cast per operator. Two casts per update remain, one kernel each:

- ``gather_grads``: the bf16 gradients are gathered (one same-dtype ``_foreach_copy_``)
  into one flat bf16 buffer and cast into one flat fp32 buffer, whose views are the fp32
  parameters' ``.grad``. Gradient clipping, the NaN/inf skip and the optimizer see fp32
  gradients of the fp32 parameters, as with the other precisions.
- ``publish``: the updated fp32 parameters, views into one flat fp32 buffer, are cast into
  the flat bf16 buffer whose views are the copy's parameters.

The fp32 model stays the trainer's ``model``: checkpoints hold fp32 weights and the
optimizer state of the fp32 parameters, as with the other precisions, so a run can resume
with another precision, and validation and decoding use it (under bf16 autocast on CUDA).

What is computed in bf16 that autocast keeps in fp32: layer norm's input and output (its
statistics are accumulated in fp32 by the kernels), the residual stream and the
positional encodings. Micro-batches of an update (``trainer.accum_steps``) add their
gradients in bf16, as DDP's all-reduce averages them in bf16 (its buckets take the
parameters' dtype). The loss and its softmax are computed in fp32 (``transformer/loss.py``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class PrecisionError(ValueError):
    """A precision setting that cannot apply to this model."""


def views_of(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Views into ``flat`` shaped as ``params``, one after the other."""
    out, at = [], 0
    for p in params:
        out.append(flat[at : at + p.numel()].view_as(p))
        at += p.numel()
    return out


def flat_views(params: list[nn.Parameter]) -> torch.Tensor:
    """Make ``params`` views into one new flat buffer of their dtype holding their values;
    returns the buffer."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, views_of(flat, params)):
        p.data = view
    return flat


class Bf16Weights:
    """A bf16 copy (``compute``) of ``model`` (the fp32 master, whose parameters become views
    into one flat buffer, values unchanged) for the training forward and backward; see the
    module docstring."""

    def __init__(self, model: nn.Module):
        rnns = [type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)]
        if rnns:
            raise PrecisionError(
                f"trainer.precision=bf16-weights needs a model without recurrent layers "
                f"({rnns[0]} keeps its weights in cuDNN's own buffer); use bf16 or fp32"
            )
        self.master_params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in self.master_params):
            raise PrecisionError("trainer.precision=bf16-weights needs an fp32 model")
        self.flat32 = flat_views(self.master_params)
        self.compute = copy.deepcopy(model).to(torch.bfloat16)
        self.compute_params = list(self.compute.parameters())
        self.flat16 = flat_views(self.compute_params)
        self.grad16 = torch.zeros_like(self.flat16)
        self.grad32 = torch.zeros_like(self.flat32)
        self.grad16_views = views_of(self.grad16, self.compute_params)
        self.grad32_views = views_of(self.grad32, self.master_params)

    @torch.no_grad()
    def publish(self) -> None:
        """The fp32 weights, rounded to bf16, into the copy (after each update and whenever
        the fp32 weights were loaded)."""
        self.flat16.copy_(self.flat32)

    @torch.no_grad()
    def gather_grads(self) -> None:
        """The copy's gradients (bf16, summed over the update's backward passes) into the
        fp32 parameters' ``.grad``, and the copy's dropped. A parameter without a gradient
        (unused by the forward pass) gets none, as it would in fp32."""
        have = [i for i, p in enumerate(self.compute_params) if p.grad is not None]
        if have:
            torch._foreach_copy_(
                [self.grad16_views[i] for i in have], [self.compute_params[i].grad for i in have]
            )
        self.grad32.copy_(self.grad16)
        have = set(have)
        for i, (p, g) in enumerate(zip(self.master_params, self.grad32_views)):
            if i in have:
                p.grad = g
            else:  # zeroed, so that the flat buffer's norm is the gradients' norm
                g.zero_()
                p.grad = None
        for p in self.compute_params:  # the module's zero_grad walks the module tree: slower
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_(fp32 parameters, max_norm)`` computed on the flat
        buffer their ``.grad`` are views of (after ``gather_grads``): one norm and one scaling
        for the whole model, without torch's per-tensor handling of the gradients in Python:
        0.15 ms of host time per update against 1.32 ms at the Multi30k config's depth on
        this project's CPU (results/bench/clip_time_cpu.md), time that a launch-bound GPU
        step waits for. Returns the total norm (NaN/inf if a gradient is)."""
        norm = torch.linalg.vector_norm(self.grad32)
        self.grad32.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
