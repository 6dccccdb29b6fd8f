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

Adam and AdamW (``FLAT_OPTIMIZERS``), whose update is elementwise, update the fp32 buffer as
one parameter (``flat_param``, its gradient the flat fp32 gradient buffer): the same
arithmetic as over each parameter (bit for bit, in tests/test_precision.py), without the
optimizer's work per parameter at every update: its step and zero_grad took 0.46 ms against
1.16 ms over the 95 parameters at the Multi30k config's depth on this project's CPU (0.55
against 2.84 for Transformer-base; results/bench/update_time_cpu.md), host time that a
launch-bound GPU step waits for. Checkpoints still hold the state per parameter
(``split_state``, ``merge_state``). One difference: a parameter without a gradient in an
update (none in this project's models, of any attention kind) is
updated as with a zero gradient, its moments decaying, where the optimizer over each
parameter would leave it alone; ``gather_grads`` warns when it happens.

What is computed in bf16 that autocast keeps in fp32: layer norm's input and output (its
statistics are accumulated in fp32 by the kernels), the residual stream and the
positional encodings. Micro-batches of an update (``trainer.accum_steps``) add their
gradients in bf16, as DDP's all-reduce averages them in bf16 (its buckets take the
parameters' dtype). The loss and its softmax are computed in fp32 (``transformer/loss.py``).
"""

from __future__ import annotations

import collections
import copy
import logging

import torch
from torch import nn

from .checkpoint import elementwise

log = logging.getLogger(__name__)

# Optimizers whose update of a tensor is elementwise: over one flat tensor it is the update
# of each parameter (a state tensor per parameter of its shape, and a step count).
FLAT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


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
        self.names = [n for n, _ in model.named_parameters()]
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
        # The fp32 buffer as one parameter, for an optimizer of FLAT_OPTIMIZERS: its updates
        # are the master parameters' (views of the same memory).
        self.flat_param = nn.Parameter(self.flat32)
        self.flat_update = False  # whether the optimizer updates flat_param (params_for)
        self.warned_unused = False

    def params_for(self, optimizer_class) -> list[nn.Parameter]:
        """The parameters for an optimizer of ``optimizer_class`` to update: ``flat_param``
        for FLAT_OPTIMIZERS, else the fp32 model's."""
        self.flat_update = isinstance(optimizer_class, type) and issubclass(
            optimizer_class, FLAT_OPTIMIZERS
        )
        return [self.flat_param] if self.flat_update else list(self.master_params)

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
        if self.flat_update:
            self.flat_param.grad = self.grad32
            if len(have) < len(self.master_params) and not self.warned_unused:
                self.warned_unused = True
                unused = sorted(set(self.names) - {self.names[i] for i in have})
                log.warning(
                    "bf16-weights: %d parameters had no gradient in an update (%s); the "
                    "optimizer over the flat buffer updates them as with a zero gradient",
                    len(unused),
                    ", ".join(unused[:5]),
                )
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
        0.15 ms of host time per update against 1.16 ms at the Multi30k config's depth on
        this project's CPU (results/bench/update_time_cpu.md), time that a launch-bound GPU
        step waits for. Returns the total norm (NaN/inf if a gradient is)."""
        norm = torch.linalg.vector_norm(self.grad32)
        self.grad32.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm


def copied(value):
    return value.clone() if torch.is_tensor(value) else value


def split_state(state: dict, params: list[nn.Parameter]) -> dict:
    """An optimizer's ``state_dict`` over one flat parameter (``Bf16Weights.flat_param``) as
    the same optimizer's over ``params``, the tensors the flat one is made of: each state
    tensor split into views shaped as the parameters, each scalar (the step) copied."""
    (group,) = state["param_groups"]
    (flat_id,) = group["params"]
    per_param = {}
    flat = state["state"].get(flat_id)
    if flat is not None:
        views = {key: views_of(v, params) for key, v in flat.items() if elementwise(v)}
        for i in range(len(params)):
            per_param[i] = {
                key: views[key][i] if key in views else copied(v) for key, v in flat.items()
            }
    return {"state": per_param, "param_groups": [{**group, "params": list(range(len(params)))}]}


def merge_state(state: dict, params: list[nn.Parameter]) -> dict:
    """An optimizer's ``state_dict`` over ``params`` (one group, as checkpoints hold it) as
    the same optimizer's over their flat concatenation: state tensors concatenated (zeros for
    a parameter without state), of each scalar (the step) the value most parameters have,
    with a warning when they differ."""
    if len(state["param_groups"]) != 1:
        raise PrecisionError("a flat optimizer state needs one parameter group")
    (group,) = state["param_groups"]
    if len(group["params"]) != len(params):
        raise PrecisionError(
            f"the optimizer state has {len(group['params'])} parameters, the model {len(params)}"
        )
    entries = [state["state"].get(i) or {} for i in group["params"]]
    merged = {}
    for key in dict.fromkeys(k for e in entries for k in e):
        values = [e.get(key) for e in entries]
        if any(elementwise(v) for v in values):
            like = next(v for v in values if v is not None)  # its dtype and device
            merged[key] = torch.cat(
                [
                    (v if v is not None else like.new_zeros(p.shape)).reshape(-1)
                    for v, p in zip(values, params)
                ]
            )
            continue
        given = [v for v in values if v is not None]
        numbers = [float(v) if torch.is_tensor(v) else v for v in given]
        counts = collections.Counter(numbers)
        if len(counts) > 1:
            log.warning(
                "optimizer state %r differs between parameters (%s); the update over the "
                "flat buffer goes on with the most common",
                key,
                dict(counts),
            )
        merged[key] = copied(given[numbers.index(counts.most_common(1)[0][0])])
    return {"state": {0: merged} if merged else {}, "param_groups": [{**group, "params": [0]}]}
