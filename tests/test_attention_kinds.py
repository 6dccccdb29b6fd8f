"""The attention family (transformer/attention/): every kind against a direct float64 formula,
causality, incremental decoding, and the whole Transformer decoding with each kind."""

import re

import pytest
import torch
import torch.nn.functional as F

from transformer import attention as A
from transformer.search import beam_search, greedy_search
from transformer.transformer_model import Transformer

OPTS = A.AttentionConfig(window=3, stride=4, summary=2, chunk=5)  # small: many edge cases
KINDS = list(A.KINDS)
PATTERNS = {
    "strided": OPTS,
    "fixed": A.AttentionConfig(stride=4, summary=2, sparse_pattern="fixed"),
}


def kind_obj(name, pattern="strided", n_heads=2, d=8):
    opts = PATTERNS[pattern] if name == "sparse" else OPTS
    return A.make_kind(name, n_heads, d, opts).eval()


def qkv(B=2, h=2, T=13, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=g) for _ in range(3)]


def key_mask(B=2, T=13):
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 7:] = False  # sentence 2 has 7 real tokens, then padding
    return A.padding_mask(m)  # (B, 1, 1, T)


# -- float64 references, written from the papers' formulas ---------------------------------


def softmax64(scores, mask):
    """Softmax where mask; rows with nothing visible are zero."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1), nan=0.0)


def pattern64(name, T_q, T_k, causal, pattern="strided"):
    """The allowed (T_q, T_k) pairs, by loops over the definitions (not masks.py)."""
    allowed = torch.zeros(T_q, T_k, dtype=torch.bool)
    stride, c = 4, 2
    for qi in range(T_q):
        i = T_k - T_q + qi
        for j in range(T_k):
            if name == "local":
                ok = abs(i - j) <= OPTS.window
            elif name == "sparse" and pattern == "strided":
                ok = abs(i - j) < stride or (i - j) % stride == 0
            elif name == "sparse":
                ok = i // stride == j // stride or j % stride >= stride - c
            else:
                ok = True
            allowed[qi, j] = ok and (j <= i or not causal)
    return allowed


def reference64(kind, name, q, k, v, mask, causal, pattern="strided"):
    """Output (B, h, T_q, d) of ``name`` in float64 with an explicit (T_q, T_k) mask."""
    q, k, v = q.double(), k.double(), v.double()
    T_q, T_k, d = q.shape[2], k.shape[2], q.shape[-1]
    full = pattern64(name, T_q, T_k, causal, pattern)
    mask = full if mask is None else mask & full
    if name == "linear":
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        a = (fq @ fk.transpose(-1, -2)) * mask  # the quadratic form of Katharopoulos eq. 4
        return a @ v / a.sum(-1, keepdim=True)
    if name == "additive":
        w = kind.score.double()  # (h, d)
        e = (torch.tanh(q[:, :, :, None, :] + k[:, :, None, :, :]) * w[:, None, None]).sum(-1)
        return softmax64(e, mask) @ v
    scale = 1.0 if name == "dot" else d**-0.5
    return softmax64(q @ k.transpose(-1, -2) * scale, mask) @ v


CASES = [(n, "strided") for n in KINDS] + [("sparse", "fixed")]


@pytest.mark.parametrize("name,pattern", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [13, 3, 16, 41])  # 41: several blocks of 16
def test_kind_matches_float64_reference(name, pattern, causal, T):
    kind = kind_obj(name, pattern)
    q, k, v = qkv(T=T)
    mask = None if causal else key_mask(T=T)  # decoder keys are never padded
    out, _ = kind(q, k, v, mask, causal)
    ref = reference64(kind, name, q, k, v, mask, causal, pattern)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,pattern", CASES)
def test_causal_with_a_key_mask_or_fewer_queries_than_keys_matches_reference(name, pattern):
    """Causal attention with a key mask too, and 3 queries after 10 earlier keys (aligned to
    the end of the keys): where SDPA's own causal flag cannot be used, the kind must still
    keep each query from the keys after it (the test above gives causal kinds neither)."""
    kind = kind_obj(name, pattern)
    q, k, v = qkv()
    for q_, mask in ((q, key_mask()), (q[:, :, -3:], None)):
        out, _ = kind(q_, k, v, mask, True)
        ref = reference64(kind, name, q_, k, v, mask, True, pattern)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,pattern", CASES)
def test_weights_path_agrees_and_rows_sum_to_one(name, pattern):
    kind = kind_obj(name, pattern)
    q, k, v = qkv()
    mask = key_mask()
    fast, _ = kind(q, k, v, mask, False)
    out, w = kind(q, k, v, mask, False, need_weights=True)
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=1e-4)
    allowed = pattern64(name, 13, 13, False, pattern) & mask  # (2, 1, 13, 13)
    assert w.shape == (2, 2, 13, 13)
    # Rows sum to 1; a padded query whose whole window is padding gets zeros, not NaN.
    torch.testing.assert_close(w.sum(-1), allowed.any(-1).float().expand(2, 2, 13))
    assert torch.all(w[1, :, :, 7:] == 0)  # padded keys
    assert torch.all(w[~allowed.expand(2, 2, 13, 13)] == 0)  # off pattern


@pytest.mark.parametrize("name,pattern", CASES)
def test_attention_dropout_drops_weights_not_outputs(name, pattern):
    """With every value 1, an output is the sum of its row of weights: 1 without dropout.
    Dropout on the weights (every kind but linear, which has none) changes those sums, the
    same in each of the d coordinates that a row's weights are shared by; dropout on the
    outputs would zero coordinates one by one."""
    kind = kind_obj(name, pattern)
    q, k, _ = qkv()
    ones = torch.ones_like(q)
    torch.manual_seed(0)
    out, _ = kind(q, k, ones, None, False, 0.5)
    if name == "linear":  # no weight matrix to drop out
        torch.testing.assert_close(out, ones)
        return
    assert not torch.allclose(out, ones)  # the weights were dropped out
    torch.testing.assert_close(out, out[..., :1].expand_as(out))


def test_pattern_masks_match_the_definitions():
    for causal in (False, True):
        for T_q, T_k in [(9, 9), (1, 9), (3, 11)]:
            torch.testing.assert_close(
                A.local_mask(T_q, T_k, 3, causal), pattern64("local", T_q, T_k, causal)
            )
            for p in ("strided", "fixed"):
                got = A.sparse_mask(T_q, T_k, p, 4, 2, causal)
                torch.testing.assert_close(got, pattern64("sparse", T_q, T_k, causal, p))


@pytest.mark.parametrize("name,pattern", CASES)
def test_causal_kinds_never_see_the_future(name, pattern):
    kind = kind_obj(name, pattern)
    q, k, v = qkv()
    out, _ = kind(q, k, v, None, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:], v2[:, :, 6:] = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    out2, _ = kind(q, k2, v2, None, True)
    torch.testing.assert_close(out[:, :, :6], out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


@pytest.mark.parametrize("name,pattern", CASES)
def test_steps_equal_the_causal_forward(name, pattern):
    kind = kind_obj(name, pattern)
    q, k, v = qkv()
    full, _ = kind(q, k, v, None, True)
    cache = kind.empty_cache(2, 2, 8, q)
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        out, cache, _ = kind.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache)
        torch.testing.assert_close(out, full[:, :, sl], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_in_fp16_keeps_its_long_sums_in_fp32(causal):
    # phi(q) . sum_j phi(k_j) grows with the keys: in fp16 it passed 65504 at 1,024 keys
    # and num / inf gave rows of zeros. fp16 tensors stand for CUDA's fp16 autocast here.
    kind = A.make_kind("linear", 2, 64, A.AttentionConfig(chunk=64)).eval()
    q, k, v = qkv(B=1, h=2, T=1024, d=64)
    ref, _ = kind(q, k, v, None, causal)
    out, _ = kind(q.half(), k.half(), v.half(), None, causal)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-2)
    # Decoding steps: the running sums (S, z) stay fp32 under bf16 activations
    T = 40
    cache = kind.empty_cache(1, 2, 64, q.bfloat16())
    assert all(c.dtype == torch.float32 for c in cache)
    for t in range(T):
        sl = slice(t, t + 1)
        step, cache, _ = kind.step(*(x[:, :, sl].bfloat16() for x in (q, k, v)), cache)
        assert step.dtype == torch.bfloat16
    full, _ = kind(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, True)
    torch.testing.assert_close(step.float(), full[:, :, T - 1 :], atol=2e-2, rtol=2e-2)


def test_fully_padded_window_gives_zeros_and_finite_gradients():
    kind = kind_obj("local")
    q, k, v = (x.requires_grad_() for x in qkv(T=12))
    m = torch.zeros(2, 12, dtype=torch.bool)
    m[:, :2] = True  # queries 6.. see only padding in their window of +-3
    out, _ = kind(q, k, v, A.padding_mask(m), False)
    assert torch.all(out[:, :, 6:] == 0)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_default_path_is_fused_sdpa_without_explicit_masks(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        calls.append((attn_mask, is_causal, scale))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = Transformer(30, 30, 0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1, n_dec_layers=1)
    src = torch.randint(3, 30, (2, 5))
    model(src, src != 0, torch.randint(3, 30, (2, 4)))
    enc_self, dec_self, cross = calls
    assert dec_self == (None, True, None)  # SDPA builds the causal mask itself
    assert enc_self[0].shape == (2, 1, 1, 5) and cross[0].shape == (2, 1, 1, 5)
    assert all(c[2] is None for c in calls)  # SDPA's default 1/sqrt(d_k)


@pytest.fixture
def sdpa_switches():
    """Every SDPA kernel allowed again after the test: the switches are process-wide."""
    yield lambda: {n: getattr(torch.backends.cuda, s.replace("enable_", "") + "_enabled")()
                   for n, s in A.SDPA_BACKENDS.items()}  # fmt: skip
    A.use_sdpa_backends(None, "cuda")


def test_sdpa_backends_restrict_cuda_kernels_and_keep_math(sdpa_switches):
    assert A.use_sdpa_backends("auto", "cuda") == ["efficient", "math"]
    assert sdpa_switches() == {"flash": False, "efficient": True, "cudnn": False, "math": True}
    assert A.use_sdpa_backends(["cudnn", "flash"], "cuda") == ["flash", "cudnn", "math"]
    assert sdpa_switches() == {"flash": True, "efficient": False, "cudnn": True, "math": True}
    assert A.use_sdpa_backends(None, "cuda") == list(A.SDPA_BACKENDS)
    assert all(sdpa_switches().values())
    for bad, named in ((["efficent"], "['efficent']"), ([], "empty list"), ("fast", "['fast']")):
        with pytest.raises(ValueError, match=f"unknown {re.escape(named)}; use auto, null"):
            A.use_sdpa_backends(bad, "cpu")  # checked on every device


def test_sdpa_backends_leave_the_cpu_its_flash_kernel(sdpa_switches):
    """torch's CPU attention reads the same switches: a CUDA-only restriction applied on the
    CPU sent every call to the slower math path."""
    assert A.use_sdpa_backends(["efficient"], "cpu") == list(A.SDPA_BACKENDS)
    assert all(sdpa_switches().values())
    q = torch.randn(2, 2, 6, 8)
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    A.use_sdpa_backends("auto", "cuda")  # what a CUDA run sets: the CPU path changes
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in {
        e.name for e in prof.events()
    }


# -- the whole Transformer --------------------------------------------------------------------

PAD, BOS, EOS, V = 0, 1, 2, 40


def model_with(encoder, decoder, cross, n_heads=4):
    torch.manual_seed(0)
    att = {**vars(OPTS), "kind": encoder, "encoder": encoder, "decoder": decoder, "cross": cross}
    return Transformer(
        V, V, PAD, d_model=32, n_heads=n_heads, d_ff=64, n_enc_layers=2, n_dec_layers=2,
        attention=att,
    ).eval()  # fmt: skip


def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (3, 11), generator=g)
    src[1, 7:] = PAD
    src[2, 4:] = PAD
    return src, src != PAD, torch.randint(3, V, (3, 9), generator=g)


SETUPS = [(k, k, k if k in A.CROSS_KINDS else "scaled_dot") for k in KINDS]


@pytest.mark.parametrize("encoder,decoder,cross", SETUPS)
def test_transformer_unrolled_decoding_equals_forward(encoder, decoder, cross):
    model = model_with(encoder, decoder, cross)
    src, src_mask, tgt = batch()
    full = model(src, src_mask, tgt)
    enc = model.encode(src, src_mask)
    state = model.init_state(enc)
    for t in range(tgt.shape[1]):
        logits, state = model.decode_step(tgt[:, t], enc, state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("encoder,decoder,cross", SETUPS)
def test_transformer_beam_search_runs_and_beam_one_is_greedy(encoder, decoder, cross):
    model = model_with(encoder, decoder, cross)
    src, src_mask, _ = batch()
    lim = dict(max_len_a=0.0, max_len_b=8)  # an untrained model rarely stops by itself
    nbest = beam_search(model, src, src_mask, BOS, EOS, beam_size=3, nbest=3, **lim)
    for hyps in nbest:
        scores = [h.score for h in hyps]
        assert len(hyps) == 3 and scores == sorted(scores, reverse=True)
    greedy = greedy_search(model, src, src_mask, BOS, EOS, **lim)
    beam1 = beam_search(model, src, src_mask, BOS, EOS, beam_size=1, alpha=0.0, **lim)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam1]


@pytest.mark.parametrize("name", KINDS)
def test_single_head_trains_one_step_with_finite_gradients(name):
    model = model_with(name, name, name if name in A.CROSS_KINDS else "scaled_dot", n_heads=1)
    model.train()
    src, src_mask, tgt = batch()
    logits = model(src, src_mask, tgt)
    F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder[0].self_attn.n_heads == 1


def test_padding_does_not_change_outputs_for_pattern_kinds():
    for name in ("local", "sparse", "linear"):
        model = model_with(name, name, "linear")
        src, src_mask, tgt = batch()
        extra = torch.cat([src, torch.full((3, 5), PAD)], 1)
        torch.testing.assert_close(
            model(src, src_mask, tgt), model(extra, extra != PAD, tgt), atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize(
    "options,message",
    [
        ({"encoder": "lokal"}, "model.attention.encoder='lokal' must be one of"),
        ({"cross": "local"}, "model.attention.cross='local' must be one of"),
        ({"widow": 3}, "model.attention.widow is not an option"),
        ({"sparse_pattern": "dense"}, "model.attention.sparse_pattern='dense'"),
        ({"window": 0}, "model.attention.window must be a positive integer"),
        # a bool is an int to Python: true was window 1 and failed in the first forward
        ({"window": True}, "model.attention.window must be a positive integer, got True"),
        # both patterns are full attention at stride 1, and the fixed one at summary = stride
        ({"kind": "sparse", "stride": 1}, "model.attention.stride=1 makes sparse attention full"),
        (
            {"kind": "sparse", "sparse_pattern": "fixed", "stride": 4, "summary": 4},
            "model.attention.summary=4 must be below model.attention.stride=4",
        ),
    ],
)
def test_bad_attention_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Transformer(V, V, PAD, d_model=16, n_heads=2, attention=options)


def test_kind_sets_both_self_attentions_and_cross_stays():
    model = Transformer(V, V, PAD, d_model=16, n_heads=2, attention={"kind": "linear"})
    assert isinstance(model.encoder[0].self_attn.kind, A.Linear)
    assert isinstance(model.decoder[0].self_attn.kind, A.Linear)
    assert isinstance(model.decoder[0].cross_attn.kind, A.ScaledDot)


def test_settings_no_role_reads_are_named_and_the_rest_pass():
    def ignored(**options):
        return A.ignored_options(A.attention_config(options))

    assert ignored() == []
    assert ignored(kind="local", window=3) == []
    assert ignored(kind="sparse", sparse_pattern="fixed", stride=4, summary=2) == []
    assert ignored(decoder="linear", chunk=5) == []  # the causal prefix sums have chunks
    assert ignored(kind="local", window=8, stride=8) == []  # the defaults say nothing
    assert [m.split(" is ")[0] for m in ignored(window=3, stride=4, chunk=5)] == [
        "model.attention.window=3", "model.attention.stride=4", "model.attention.chunk=5"
    ]  # fmt: skip
    assert ignored(kind="sparse", summary=2)[0].startswith("model.attention.summary=2 is for")
    assert ignored(encoder="linear", cross="linear", chunk=5)  # neither is causal
    assert ignored(kind="linear", encoder="local", decoder="sparse")[0].startswith(
        "model.attention.kind=linear sets no role"
    )
