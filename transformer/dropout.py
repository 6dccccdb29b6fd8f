"""Dropout (Srivastava et al. 2014) whose CPU mask is drawn by vectorised kernels.

``torch.nn.functional.dropout`` draws its CPU mask with ``bernoulli_``, which samples element
by element: it was 15% of a CPU training step of the default Transformer, the second largest
operator after matrix products (``results/bench/profile_cpu.md``). Keeping an element when a
uniform draw is at least p is the same Bernoulli(1 - p) mask, drawn by ``torch.rand``'s
vectorised generator (``bench/train_speed.py --ablate`` times both in a training step).
Elsewhere (CUDA) the fused kernel of ``F.dropout`` is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAND_MASK_ON_CPU = True  # False: torch's own CPU mask (bench/train_speed.py --ablate)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not RAND_MASK_ON_CPU:
        return F.dropout(x, p, training=True)
    keep = torch.rand_like(x) >= p  # bool, 1 byte per element kept for the backward
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, ``train``/``eval`` and repr) through ``dropout`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
