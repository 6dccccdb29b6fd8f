"""Small random models and padded source batches shared by the search and decoding tests
(imported as a plain module: pytest puts tests/ on sys.path)."""

import torch

from transformer.rnn_model import BahdanauRNN
from transformer.transformer_model import Transformer

PAD, BOS, EOS, V = 0, 1, 2, 30


def make(kind: str) -> torch.nn.Module:
    """A seeded model in eval mode: "transformer", or the Bahdanau RNN with attention ``kind``."""
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(
            V, V, PAD, d_model=32, n_heads=4, d_ff=64, n_enc_layers=1, n_dec_layers=2
        ).eval()
    return BahdanauRNN(V, V, PAD, emb_dim=16, hidden_size=32, attention=kind).eval()


def sources(B: int = 4, S: int = 7, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, mask): random tokens with rows 1 and 3 padded after 4 and 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (B, S), generator=g)
    src[1, 4:] = PAD
    src[3, 2:] = PAD
    return src, src != PAD
