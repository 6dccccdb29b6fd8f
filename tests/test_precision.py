"""trainer.precision=bf16-weights: a bf16 copy of the model runs the training passes, the
fp32 model is updated and saved (transformer/precision.py)."""

import pytest
import torch

from transformer import checkpoint
from transformer.precision import Bf16Weights, PrecisionError, merge_state, split_state
from transformer.rnn_model import BahdanauRNN
from transformer.trainer import Trainer, TrainingError
from transformer.transformer_model import Transformer


def tiny_transformer() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        40, 40, 0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1, n_dec_layers=1, dropout=0.0
    )


def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 40, (3, 7), generator=g)
    tgt = torch.randint(3, 40, (3, 6), generator=g)
    return src, src != 0, tgt[:, :-1], tgt[:, 1:]


def test_the_fp32_model_keeps_its_values_in_one_buffer_and_the_copy_is_them_rounded():
    model = tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mixed = Bf16Weights(model)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    start = mixed.flat32.untyped_storage().data_ptr()
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == start  # views of the one fp32 buffer
    for p, q in zip(model.parameters(), mixed.compute.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16))
    # Tied embeddings stay tied in the copy (one parameter, so one update reaches both).
    assert model.out_proj.weight is model.tgt_embed.weight
    assert mixed.compute.out_proj.weight is mixed.compute.tgt_embed.weight

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimizer step on the fp32 model
    mixed.publish()
    p, q = next(model.parameters()), next(mixed.compute.parameters())
    assert torch.equal(q, p.to(torch.bfloat16))


def test_gather_grads_hands_the_copys_gradients_to_the_fp32_parameters():
    model = tiny_transformer()
    mixed = Bf16Weights(model)
    src, src_mask, tgt_in, tgt_out = batch()
    logits = mixed.compute(src, src_mask, tgt_in)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten()).backward()
    expected = [p.grad.float() for p in mixed.compute.parameters()]
    mixed.gather_grads()
    for p, g in zip(model.parameters(), expected):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, g)
        assert p.grad.untyped_storage().data_ptr() == mixed.grad32.untyped_storage().data_ptr()
    assert all(q.grad is None for q in mixed.compute.parameters())


def test_a_parameter_the_forward_does_not_use_gets_no_gradient():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 3), "unused": torch.nn.Linear(3, 3)})
    mixed = Bf16Weights(model)
    mixed.compute["used"](torch.ones(2, 3, dtype=torch.bfloat16)).sum().backward()
    mixed.gather_grads()
    assert model["used"].weight.grad is not None and model["unused"].weight.grad is None


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and left as it is
def test_clipping_on_the_flat_buffer_is_torchs_clip_grad_norm(max_norm):
    """Also after an update in which a parameter had no gradient: its stale values in the
    flat buffer must not count in the norm."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 4), "unused": torch.nn.Linear(3, 2)})
    mixed = Bf16Weights(model)
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    (mixed.compute["used"](x).sum() + mixed.compute["unused"](x).sum()).backward()
    mixed.gather_grads()  # both have gradients in this update
    (mixed.compute["used"](x) ** 2).sum().backward()
    mixed.gather_grads()  # only "used" has one
    have = [p for p in model.parameters() if p.grad is not None]
    assert len(have) == 2  # the used layer's weight and bias
    reference = [torch.nn.Parameter(p.detach().clone()) for p in have]
    for r, p in zip(reference, have):
        r.grad = p.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    assert expected_norm > 1.0  # so that the small max_norm clips
    torch.testing.assert_close(mixed.clip_grad_norm_(max_norm), expected_norm)
    torch.testing.assert_close([p.grad for p in have], [r.grad for r in reference])


ADAMW = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01, fused=True)


def train_steps(mixed: Bf16Weights, optimizer, steps: int, seed: int) -> None:
    """``steps`` updates of the tiny Transformer through its bf16 copy."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src = torch.randint(3, 40, (3, 7), generator=g)
        tgt = torch.randint(3, 40, (3, 6), generator=g)
        logits = mixed.compute(src, src != 0, tgt[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten())
        loss.backward()
        mixed.gather_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mixed.publish()


def flat_and_per_parameter():
    """Two bf16-weights copies of one model: AdamW over the flat buffer and over each
    parameter."""
    flat, each = Bf16Weights(tiny_transformer()), Bf16Weights(tiny_transformer())
    flat_opt = torch.optim.AdamW(flat.params_for(torch.optim.AdamW), **ADAMW)
    each_opt = torch.optim.AdamW(each.master_params, **ADAMW)
    return (flat, flat_opt), (each, each_opt)


def test_adamw_over_the_flat_buffer_is_adamw_over_each_parameter():
    (flat, flat_opt), (each, each_opt) = flat_and_per_parameter()
    assert flat_opt.param_groups[0]["params"] == [flat.flat_param] and flat.flat_update
    assert torch.equal(flat.flat32, each.flat32)
    for mixed, opt in [(flat, flat_opt), (each, each_opt)]:
        train_steps(mixed, opt, 3, seed=2)
    assert torch.equal(flat.flat32, each.flat32)  # the same elementwise arithmetic
    assert not torch.equal(flat.flat32, Bf16Weights(tiny_transformer()).flat32)  # it moved
    for p, q in zip(flat.master_params, flat.compute_params):  # the model sees the update
        assert torch.equal(q, p.to(torch.bfloat16))


def test_the_flat_optimizer_state_is_saved_and_loaded_per_parameter():
    """split_state gives what AdamW over each parameter would hold, and merge_state takes
    it back: a run goes on the same either way after saving or loading."""
    (flat, flat_opt), (each, each_opt) = flat_and_per_parameter()
    for mixed, opt in [(flat, flat_opt), (each, each_opt)]:
        train_steps(mixed, opt, 2, seed=3)
    saved = split_state(flat_opt.state_dict(), flat.master_params)
    expected = each_opt.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for i, p in enumerate(each.master_params):
        got, want = saved["state"][i], expected["state"][i]
        assert got.keys() == want.keys() and got["exp_avg"].shape == p.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    # Per-parameter state (a checkpoint of another precision) loaded into the flat optimizer
    # and the flat state into the per-parameter optimizer: both go on as before.
    flat_opt.load_state_dict(merge_state(expected, flat.master_params))
    each_opt.load_state_dict(saved)
    merged = flat_opt.state_dict()["state"][0]
    assert merged["exp_avg"].shape == flat.flat32.shape and float(merged["step"]) == 2
    for mixed, opt in [(flat, flat_opt), (each, each_opt)]:
        train_steps(mixed, opt, 2, seed=4)
    assert torch.equal(flat.flat32, each.flat32)


def test_merging_fills_a_parameter_without_state_and_warns_about_steps_that_differ(caplog):
    params = [torch.nn.Parameter(torch.ones(n)) for n in (2, 3, 1)]
    state = {
        "state": {  # the saved parameter 1 (of three) has no state
            0: {"step": torch.tensor(4.0), "exp_avg": torch.full((2,), 7.0)},
            2: {"step": torch.tensor(4.0), "exp_avg": torch.full((1,), 1.0)},
        },
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}],
    }
    merged = merge_state(state, params)
    assert merged["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(merged["state"][0]["exp_avg"], torch.tensor([7.0, 7, 0, 0, 0, 1]))
    assert float(merged["state"][0]["step"]) == 4 and not caplog.records

    state["state"][1] = {"step": torch.tensor(6.0), "exp_avg": torch.full((3,), 2.0)}
    merged = merge_state(state, params)
    assert float(merged["state"][0]["step"]) == 4  # that of two parameters of three
    assert "'step' differs between parameters ({4.0: 2, 6.0: 1})" in caplog.text
    state["state"][0]["step"] = torch.tensor(9.0)  # the odd one out first: not taken either
    state["state"][1]["step"] = torch.tensor(4.0)
    assert float(merge_state(state, params)["state"][0]["step"]) == 4
    with pytest.raises(PrecisionError, match="has 3 parameters, the model 2"):
        merge_state(state, params[:2])


def test_a_parameter_without_gradient_is_warned_about_under_the_flat_optimizer(caplog):
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 3), "unused": torch.nn.Linear(3, 3)})
    mixed = Bf16Weights(model)
    mixed.params_for(torch.optim.AdamW)
    mixed.compute["used"](torch.ones(2, 3, dtype=torch.bfloat16)).sum().backward()
    mixed.gather_grads()
    assert "2 parameters had no gradient in an update (unused.bias, unused.weight)" in caplog.text
    assert torch.equal(mixed.flat_param.grad[-12:], torch.zeros(12))  # as a zero gradient


def test_other_optimizers_update_each_parameter():
    mixed = Bf16Weights(tiny_transformer())
    assert mixed.params_for(torch.optim.Adagrad) == mixed.master_params
    assert not mixed.flat_update


def test_recurrent_models_are_refused_with_the_reason():
    with pytest.raises(PrecisionError, match="GRU keeps its weights in cuDNN's own buffer"):
        Bf16Weights(BahdanauRNN(40, 40, 0, emb_dim=8, hidden_size=8))


def trainer_of(compose, small_overrides, tmp_path, name, *extra) -> Trainer:
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
    cfg = compose([*overrides, f"run_dir={run}", *extra])
    return Trainer(cfg, run)


NO_DROPOUT = ("model.dropout=0", "model.attn_dropout=0", "model.act_dropout=0")


def test_the_update_gradient_matches_fp32_training(compose, small_overrides, tmp_path):
    """Two micro-batches through the bf16 copy give the fp32 parameters nearly the fp32
    run's gradient (same initial weights: same seed)."""
    fp32 = trainer_of(compose, small_overrides, tmp_path, "fp32", *NO_DROPOUT)
    bf16 = trainer_of(
        compose, small_overrides, tmp_path, "bf16w", *NO_DROPOUT, "trainer.precision=bf16-weights"
    )
    assert fp32.precision == "fp32" and bf16.precision == "bf16-weights"
    stream = fp32.batches()
    micro = [next(stream)[1] for _ in range(2)]
    grads = []
    for trainer in (fp32, bf16):
        trainer.accumulate(micro, 100.0)
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()]))
    assert grads[1].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99, cosine  # 0.9986 measured; a misplaced view gives ~0
    ratio = grads[1].norm() / grads[0].norm()
    assert 0.99 < ratio < 1.01, ratio


def test_bf16_weights_trains_saves_fp32_and_resumes_across_precisions(
    compose, small_overrides, tmp_path
):
    steps = ("trainer.max_steps=30", "trainer.eval_every=30", "trainer.bleu_every=30")
    losses = {}
    for name, precision in [("fp32", "fp32"), ("bf16w", "bf16-weights")]:
        trainer = trainer_of(
            compose, small_overrides, tmp_path, name, *NO_DROPOUT, *steps,
            f"trainer.precision={precision}", "trainer.log_every=5",
        )  # fmt: skip
        trainer.run()
        rows = (tmp_path / name / "train_log.csv").read_text().splitlines()[1:]
        losses[name] = [float(r.split(",")[2]) for r in rows]
    # The copy is updated: the loss falls as in fp32 (a copy left stale would stay flat).
    # Measured: 5.83 -> 5.04 in both, equal to 3 decimals at every logged step.
    assert losses["bf16w"][-1] < 0.9 * losses["bf16w"][0]
    assert losses["bf16w"] == pytest.approx(losses["fp32"], rel=0.01)

    saved = checkpoint.load(tmp_path / "bf16w" / "checkpoints" / "last.pt")
    assert all(v.dtype == torch.float32 for v in saved["model"].values())
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k
    # AdamW updated the flat buffer; the checkpoint holds its state per parameter, as fp32's.
    assert trainer.optimizer.param_groups[0]["params"] == [trainer.mixed.flat_param]
    fp32_optim = checkpoint.load(tmp_path / "fp32" / "checkpoints" / "last.pt")["optimizer"]
    assert saved["optimizer"]["param_groups"] == fp32_optim["param_groups"]
    for i, p in enumerate(trainer.model.parameters()):
        entry = saved["optimizer"]["state"][i]
        assert entry["exp_avg"].shape == p.shape and float(entry["step"]) == 30, i

    # ... so an fp32 run goes on from it with each parameter's moments.
    as_fp32 = trainer_of(
        compose, small_overrides, tmp_path, "bf16w", *NO_DROPOUT, *steps, "trainer.precision=fp32"
    )
    as_fp32.run()
    assert as_fp32.step == 30
    state = as_fp32.optimizer.state_dict()["state"]
    for i in saved["optimizer"]["state"]:
        torch.testing.assert_close(state[i], saved["optimizer"]["state"][i], rtol=0, atol=0)

    # An fp32 run goes on with bf16-weights: the copy is made from the loaded weights.
    resumed = trainer_of(
        compose, small_overrides, tmp_path, "fp32", *NO_DROPOUT, *steps,
        "trainer.precision=bf16-weights",
    )  # fmt: skip
    resumed.run()  # at max_steps already: loads the checkpoint and trains nothing
    assert resumed.step == 30
    fp32_last = checkpoint.load(tmp_path / "fp32" / "checkpoints" / "last.pt")["model"]
    for (name, p), q in zip(resumed.model.named_parameters(), resumed.compute_model.parameters()):
        assert torch.equal(p, fp32_last[name]) and torch.equal(q, p.to(torch.bfloat16)), name
    moments = [fp32_optim["state"][i]["exp_avg"].reshape(-1) for i in fp32_optim["state"]]
    flat_state = resumed.optimizer.state_dict()["state"][0]
    assert torch.equal(flat_state["exp_avg"], torch.cat(moments))


def test_an_unknown_precision_or_an_rnn_with_bf16_weights_is_a_clear_error(
    compose, small_overrides, tmp_path
):
    with pytest.raises(TrainingError, match="trainer.precision must be one of .* got 'bf17'"):
        trainer_of(compose, small_overrides, tmp_path, "a", "trainer.precision=bf17")
    rnn = [o for o in small_overrides if not o.startswith("model.")]
    with pytest.raises(TrainingError, match="bf16-weights needs a model without recurrent"):
        trainer_of(compose, rnn, tmp_path, "b", "model=rnn", "trainer.precision=bf16-weights")


def test_out_of_memory_retried_in_halves_keeps_the_gradient(compose, small_overrides, tmp_path):
    """A retried update starts from no gradient in the copy: the halves' gradients are the
    whole batch's (up to bf16 rounding), not added to the failed attempt's."""
    trainer = trainer_of(
        compose, small_overrides, tmp_path, "oom", *NO_DROPOUT, "trainer.precision=bf16-weights"
    )
    stream = trainer.batches()
    batch = max((next(stream)[1] for _ in range(3)), key=lambda b: len(b.src))
    trainer.accumulate([batch], 100.0)
    expected = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    trainer.optimizer.zero_grad(set_to_none=True)

    forward, calls = trainer.compute_model.forward, []

    def small_memory(src, *rest, **kw):
        calls.append(len(src))
        out = forward(src, *rest, **kw)
        if len(src) == len(batch.src):  # fails after the forward: a graph is half built
            out.sum().backward()  # and gradients may already have been written
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    trainer.compute_model.forward = small_memory
    trainer.accumulate([batch], 100.0)
    assert calls == [len(batch.src), (len(batch.src) + 1) // 2, len(batch.src) // 2]
    got = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    cosine = torch.nn.functional.cosine_similarity(expected, got, dim=0)
    assert cosine > 0.999 and 0.99 < got.norm() / expected.norm() < 1.01, cosine


@pytest.mark.parametrize(
    "asked,capability,expected",
    [
        ("auto", (9, 0), "bf16"),  # H100
        ("auto", (8, 0), "bf16"),  # A100
        ("auto", (7, 5), "fp32"),  # T4: bf16 emulated in fp32; fp16 not run on a GPU here
        ("auto", (6, 1), "fp32"),
        ("fp32", (9, 0), "fp32"),
        ("fp16", (9, 0), "fp16"),
        ("bf16", (7, 5), "bf16"),  # as asked, with a warning
        ("bf16-weights", (7, 5), "bf16-weights"),
    ],
)
def test_auto_precision_picks_what_the_gpu_has_tensor_cores_for(
    monkeypatch, caplog, asked, capability, expected
):
    from transformer.settings import resolve_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    with caplog.at_level("INFO", logger="transformer.settings"):
        assert resolve_precision(asked, torch.device("cuda", 0)) == expected
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if asked.startswith("bf16") and capability < (8, 0):
        assert warned == [
            f"trainer.precision={asked} on GPU (compute capability 7.5): no tensor cores for "
            "bf16 there (PyTorch emulates its products in fp32); trainer.precision=auto picks "
            "fp32"
        ]
    else:
        assert warned == []


def test_off_cuda_autocast_precisions_run_as_fp32():
    from transformer.settings import resolve_precision

    cpu = torch.device("cpu")
    got = [resolve_precision(p, cpu) for p in ("auto", "bf16", "fp16", "fp32", "bf16-weights")]
    assert got == ["fp32", "fp32", "fp32", "fp32", "bf16-weights"]


def test_fp16_trains_through_the_grad_scaler_and_skips_an_overflow(
    compose, small_overrides, tmp_path, monkeypatch
):
    """trainer.precision=fp16 (autocast and torch's GradScaler, on the host path): run on the
    CPU, where the trainer itself trains fp32, by choosing fp16 for it, as no GPU is here.
    An update is scaled, unscaled before clipping and taken; an overflowing one is skipped,
    leaves the weights alone and halves the scale; the scale is saved and resumed."""
    from transformer import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda asked, device: "fp16")
    trainer = trainer_of(compose, small_overrides, tmp_path, "a", *NO_DROPOUT)
    assert trainer.scaler.is_enabled() and not trainer.skip_on_device
    stream = trainer.batches()
    first, second = next(stream)[1], next(stream)[1]
    with torch.no_grad(), trainer.autocast(training=True):
        assert trainer.loss(trainer.to_device(first)).dtype == torch.float32  # softmax: fp32
    scale = trainer.scaler.get_scale()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss, ntok = trainer.train_step([first])
    assert torch.isfinite(loss) and ntok > 0 and trainer.step == 0  # run() counts steps
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.get_scale() == scale  # no overflow: kept (grows after 2,000)
    after_first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    weight = next(trainer.compute_model.parameters())
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    assert trainer.train_step([second]) is None  # skipped on the host
    hook.remove()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, after_first[k]), k
    assert trainer.scaler.get_scale() == scale / 2
    trainer.step = 1
    trainer.save_checkpoint()
    resumed = trainer_of(compose, small_overrides, tmp_path, "a", *NO_DROPOUT)
    resumed.resume()
    assert resumed.scaler.get_scale() == scale / 2
    # a checkpoint of another precision saved its scaler off, empty: fp16 starts afresh
    # (load_state_dict raised "The source state dict is empty")
    ckpt = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    checkpoint.save(tmp_path / "a" / "checkpoints" / "last.pt", {**ckpt, "scaler": {}})
    again = trainer_of(compose, small_overrides, tmp_path, "a", *NO_DROPOUT)
    assert again.resume() and again.scaler.get_scale() == scale
