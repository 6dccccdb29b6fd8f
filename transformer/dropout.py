"""Dropout (Srivastava et al. 2014) whose CPU mask is drawn from raw random bits.

On the CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_`` (12.5 ns per
element on the 2-core development machine), and a mask from ``torch.rand_like(x) >= p`` still
costs 6.3 ns, one float draw per element. Here each 64-bit draw of torch's generator
(``random_`` on int64) is split into four 15-bit integers, and an element is kept when its
integer is at least ``round(p * 2**15)``: a Bernoulli mask whose drop probability is ``p``
rounded to a multiple of 2**-15 (at most 1.5e-5 away), with the kept values scaled by the
inverse of the rounded keep probability, so that the expected output is exactly the input
in fp32 (in bf16 the scale itself rounds: 1.109375 for 1/0.9, as in torch's own dropout)
(3.0 ns per element). The mask is a float tensor holding 0 or that scale, so the forward and
the backward are one multiplication each (a float times a bool tensor is a slow path):
dropout's forward + backward on 4,096 x 1,024 activations takes 18 ms, against 38 ms with the
``torch.rand`` mask and 68 ms with ``F.dropout`` (``bench/dropout_masks.py``,
``results/bench/dropout_masks_cpu.md``; ``bench/train_speed.py --ablate`` times the whole
training step with torch's own mask).

The draws come from torch's default CPU generator, so ``torch.manual_seed`` and the saved RNG
state of a checkpoint reproduce the masks. Elsewhere (CUDA) the fused kernel of ``F.dropout`` is
used.

Inside torch.compile (``trainer.compile``) the CPU mask is drawn by the operator
``mt_dropout::keep_mask``, which the compiler calls without looking into it. Traced as it is,
the in-place ``random_`` split the graph at every dropout; ``F.dropout``, traced instead, has
inductor draw one random number per element inside its fused kernels, and the compiled
Multi30k model trained at 1,281 target tokens/s against 1,851 with the operator (2,054 eager;
``results/bench/train_speed_cpu_compile.md``, 2-core CPU). The operator is tagged as random, so
the compiler neither merges two draws nor draws again in the backward. It draws from torch's
generator, so a seed reproduces a compiled run, but the compiled code may draw the masks in
another order than eager code (independent dropouts are scheduled as the compiler likes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAND_MASK_ON_CPU = True  # False: torch's own CPU mask (bench/train_speed.py --ablate)
_BITS = 15  # a 64-bit draw has 63 random bits (random_ on int64 samples [0, 2**63)): 4 x 15 used
_LEVELS = 1 << _BITS


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A tensor shaped like ``x`` holding 0 with probability ~``p``, else 1 / (1 - ~``p``).

    ``~p`` is ``p`` rounded to a multiple of 2**-15; ``0 < p`` and ``round(p * 2**15) < 2**15``.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    bits = words.view(torch.int16)[:n].view(x.shape).bitwise_and_(_LEVELS - 1)
    drop_levels = round(p * _LEVELS)
    return (bits >= drop_levels).to(x.dtype).mul_(_LEVELS / (_LEVELS - drop_levels))


# keep_mask as an operator that torch.compile calls as it is (see the module docstring); its
# stand-in for tracing gives the real mask's layout (contiguous, whatever the strides of x)
_LIB = torch.library.Library("mt_dropout", "DEF")
_LIB.define("keep_mask(Tensor x, float p) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
_LIB.impl("keep_mask", lambda x, p: keep_mask(x, p), "CPU")
torch.library.register_fake("mt_dropout::keep_mask", lambda x, p: x.new_empty(x.shape), lib=_LIB)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - ``p``)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or round(p * _LEVELS) >= _LEVELS or not RAND_MASK_ON_CPU:
        return F.dropout(x, p, training=True)
    if torch.compiler.is_compiling():
        return x * torch.ops.mt_dropout.keep_mask(x.detach(), p)
    return x * keep_mask(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, ``train``/``eval`` and repr) through ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
