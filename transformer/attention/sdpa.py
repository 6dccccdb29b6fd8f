"""Which CUDA kernels ``F.scaled_dot_product_attention`` may use (``trainer.sdpa_backends``)."""

from __future__ import annotations

import torch

SDPA_BACKENDS = {
    "flash": "enable_flash_sdp",  # FlashAttention-2: no attn_mask, so causal-only calls
    "efficient": "enable_mem_efficient_sdp",  # memory-efficient (CUTLASS), takes masks
    "cudnn": "enable_cudnn_sdp",  # cuDNN fused attention
    "math": "enable_math_sdp",  # the unfused matmul-softmax-matmul; always the last resort
}
# What ``auto`` (the default) allows on CUDA. On an H200 the memory-efficient kernel alone
# trained Transformer-base at 25k-token Multi30k batches 13-17% faster than torch's pick
# (cuDNN), and the Multi30k config at 4k tokens -1% and +9% in two runs
# (results/bench/train_speed_h200_sdpa_base.md, _rows_base.md, _sdpa_small.md, _rows_small.md)
AUTO_CUDA_SDPA = ("efficient",)


def use_sdpa_backends(names, device) -> list[str]:
    """Allow only the named SDPA kernels (a name or a list) on CUDA, process-wide; ``None``
    = all of them, and torch picks one per call; ``"auto"`` = ``AUTO_CUDA_SDPA``. ``math``
    stays allowed in every case, so a call that no fused kernel accepts still runs. Why it
    is a setting: on an H100, with Multi30k's 15-30-token sentences, the cuDNN kernel torch
    picked took 30% of the GPU time of a Transformer-base step
    (results/bench/profile_h100_eager.md), and ``bench/train_speed.py --sdpa`` measures the
    others. On any other ``device`` the names are checked and every kernel stays allowed:
    torch's CPU attention reads the same process-wide switches (flash off sends it to the
    slower math path). Returns the backends now allowed."""
    on_cuda = torch.device(device).type == "cuda"
    if names == "auto":
        names = list(AUTO_CUDA_SDPA)
    elif isinstance(names, str):
        names = [names]
    allowed = list(SDPA_BACKENDS) if names is None else [str(n) for n in names]
    unknown = [n for n in allowed if n not in SDPA_BACKENDS]
    if unknown or not allowed:
        raise ValueError(
            f"trainer.sdpa_backends: unknown {unknown or 'empty list'}; use auto, null or a "
            f"list of {list(SDPA_BACKENDS)}"
        )
    if not on_cuda:
        allowed = list(SDPA_BACKENDS)
    allowed = [n for n in SDPA_BACKENDS if n in allowed or n == "math"]
    for name, switch in SDPA_BACKENDS.items():
        getattr(torch.backends.cuda, switch)(name in allowed)
    return allowed
