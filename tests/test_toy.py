"""A toy task every working model learns quickly: reverse a random token string.

A broken attention mask, a shifted target or a wrong decode loop keeps accuracy far below
the bar, so this fails on real bugs. Accuracy is measured by greedy decoding, token by token.
"""

import pytest
import torch
import torch.nn.functional as F

from transformer.rnn_model import BahdanauRNN
from transformer.search import greedy_search
from transformer.transformer_model import Transformer

PAD, BOS, EOS, V = 0, 1, 2, 14


def reverse_batch(g, B=64, lo=3, hi=8):
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    S = int(lengths.max()) + 1
    src = torch.full((B, S), PAD)
    tgt_in = torch.full((B, S), PAD)
    tgt_out = torch.full((B, S), PAD)
    for b, n in enumerate(lengths.tolist()):
        x = torch.randint(3, V, (n,), generator=g)
        src[b, :n], src[b, n] = x, EOS
        y = x.flip(0)
        tgt_in[b, 0], tgt_in[b, 1 : n + 1] = BOS, y
        tgt_out[b, :n], tgt_out[b, n] = y, EOS
    return src, tgt_in, tgt_out


def train_and_score(model, steps, lr):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        src, tgt_in, tgt_out = reverse_batch(g)
        logits = model(src, src != PAD, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, _, tgt_out = reverse_batch(torch.Generator().manual_seed(123), B=200)
    hyps = greedy_search(model, src, src != PAD, BOS, EOS, max_len_a=1.0, max_len_b=2)
    correct = total = 0
    for h, ref in zip(hyps, tgt_out.tolist()):
        ref = ref[: ref.index(EOS)]
        total += len(ref)
        correct += sum(a == b for a, b in zip(h.tokens, ref))
    return correct / total


def test_transformer_learns_reversal():
    torch.manual_seed(0)
    model = Transformer(
        V, V, PAD, d_model=64, n_heads=4, d_ff=128, n_enc_layers=2, n_dec_layers=2, dropout=0.0
    )
    # lr 1e-3: at 2e-3 (no warmup) seed 0 fell to 0.80 with AVX512 kernels and passed with
    # AVX2; at 1e-3 seeds 0-7 gave 0.979-1.0 with both.
    assert train_and_score(model, steps=400, lr=1e-3) >= 0.95


@pytest.mark.parametrize("attention", ["additive", "dot", "general"])
def test_rnn_learns_reversal(attention):
    torch.manual_seed(0)
    model = BahdanauRNN(V, V, PAD, emb_dim=32, hidden_size=64, dropout=0.0, attention=attention)
    # 200 steps: seeds 0-2 (weights and batches) of each attention reached 1.0 by step 200,
    # at step 150 the lowest was 0.959
    assert train_and_score(model, steps=200, lr=3e-3) >= 0.95
