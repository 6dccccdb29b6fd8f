"""trainer.compile=true: torch.compile(dynamic=True) trains like the eager model and saves
the plain module (slow: compiling takes 1-3 minutes on a 2-core CPU, ``pytest -m slow``);
trainer.compile_mode, and the bookkeeping CUDA graphs need (reduce-overhead), without CUDA."""

import csv

import pytest
import torch
from tiny_models import PAD, V, sources

from transformer import checkpoint, dropout
from transformer.compiling import compile_dynamic
from transformer.loss import projected_loss, sequence_loss
from transformer.packing import pack_batch
from transformer.seq2seq import Batch
from transformer.settings import COMPILE_MODES
from transformer.trainer import Trainer, TrainingError, train
from transformer.transformer_model import Transformer


@pytest.mark.slow
# fused_loss=false: the loss over the logits is compiled too (auto: fused on the CPU, eager)
@pytest.mark.parametrize("precision, fused", [("fp32", "false"), ("bf16-weights", "auto")])
def test_compiled_training_matches_eager_and_saves_the_plain_module(
    compose, small_overrides, tmp_path, precision, fused
):
    bf16 = precision == "bf16-weights"
    no_dropout = [
        f"trainer.precision={precision}",  # bf16-weights: the bf16 copy is compiled
        f"trainer.fused_loss={fused}",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "trainer.log_every=1",
        "model.dropout=0.0",  # compiled dropout draws other masks than eager dropout
        "model.attn_dropout=0.0",
        "model.act_dropout=0.0",
    ]
    # fp32: plain SGD, whose update is the gradient's own size, so the weights can be held
    # to rounding. (With Adam at lr 1e-3 the rounding of a gradient near zero flipped a
    # whole step: 1 of 96 weights of a layer norm 0.00103-0.00114 apart, a failure on a
    # 1e-3 bound that moved from run to run.) bf16-weights keeps Adam and counts the weights
    # that end more than a step apart, below.
    if bf16:
        no_dropout.append("trainer.optimizer.lr=1e-3")
    else:
        no_dropout += ["trainer.optimizer._target_=torch.optim.SGD", "trainer.optimizer.lr=0.5",
                       "~trainer.optimizer.betas", "~trainer.optimizer.eps",
                       "trainer.clip_norm=1e9"]  # fmt: skip
    runs, losses = {}, {}
    for compiled in (False, True):
        run = tmp_path / f"run-{compiled}"
        overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
        cfg = compose([*overrides, *no_dropout, f"run_dir={run}", f"trainer.compile={compiled}"])
        metrics = train(cfg)
        assert metrics["steps"] == 3
        runs[compiled] = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
        with open(run / "train_log.csv", newline="") as f:
            losses[compiled] = [float(row["loss"]) for row in csv.DictReader(f)]

    # Same batches, same initial weights, no dropout: the same losses up to rounding (the
    # first one is a pure forward of the initial weights), and the same weights up to
    # rounding (fp32, SGD). In bf16 a fused kernel rounds in other places than the eager
    # operators: looser bounds.
    assert len(losses[True]) == 3
    # (train_log.csv rounds to 1e-4: two losses that agree may differ by one in the last digit)
    assert losses[True] == pytest.approx(losses[False], abs=2e-2 if bf16 else 2e-4)
    eager, compiled = runs[False], runs[True]
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefix in the checkpoint
    for name in eager:
        assert compiled[name].dtype == torch.float32, name
        if not bf16:
            torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4)
    if bf16:  # a bf16 gradient near zero may round to the other sign: Adam then moves that
        # weight the other way by up to lr per step; few weights may be more than one step apart
        apart = sum(int(((compiled[k] - eager[k]).abs() > 1e-3).sum()) for k in eager)
        total = sum(v.numel() for v in eager.values())
        assert apart <= 0.01 * total, (apart, total)  # measured: 188 of 50,304 (0.4%)


def count_mask_draws(monkeypatch) -> list:
    """The shapes of the CPU dropout masks drawn from now on (eager, or compiled code calling
    the mt_dropout::keep_mask operator), in the order drawn."""
    draws, draw = [], dropout.keep_mask
    monkeypatch.setattr(dropout, "keep_mask", lambda x, p: draws.append(x.shape) or draw(x, p))
    return draws


def model_with_dropout():
    """A 1+2-layer Transformer in training mode with every dropout on, and a batch for it
    (source, source mask, target input, target output). The target is a copy of the
    source, not a view of it: like collated batches, no two inputs share storage
    (transformer/compiling.py)."""
    torch.manual_seed(0)
    drop = dict(dropout=0.1, attn_dropout=0.1, act_dropout=0.1)
    model = Transformer(V, V, PAD, 32, 4, 64, 1, 2, **drop).train()
    src, mask = sources()
    tgt = src.clone()
    return model, (src, mask, tgt[:, :5], tgt[:, 1:6])


def test_the_training_forward_and_the_loss_trace_without_graph_breaks(monkeypatch):
    """What trainer.compile compiles is whole: the training forward (with the CPU's dropout,
    whose in-place ``random_`` broke the graph at every dropout, and each break inside a
    Sublayer recompiled it per lambda) and the unfused loss are one graph each. The graph
    calls the CPU mask as an operator, once per dropout, instead of tracing ``F.dropout``
    (inductor's per-element random numbers: 44% longer steps). The fused loss is not traced
    at all: its real-token rows have a data-dependent count, and tracing it recompiled at
    every new count (Dynamo only traces, nothing compiles: fast)."""
    model, (src, mask, tgt_in, tgt_out) = model_with_dropout()
    draws = count_mask_draws(monkeypatch)
    model(src, mask, tgt_in, project=False)
    assert len(draws) == 13  # embeddings 2, sublayers 2 + 2 x 3, FFN activations 1 + 2
    forward = torch._dynamo.explain(model)(src, mask, tgt_in, project=False)
    assert (forward.graph_count, forward.graph_break_count) == (1, 0), forward.break_reasons
    called = [
        str(n.target)
        for g in forward.graphs
        for n in g.graph.nodes
        if n.op == "call_function" and ("drop" in str(n.target) or "rand" in str(n.target))
    ]
    assert called == ["mt_dropout.keep_mask"] * 13, called
    logits = model(src, mask, tgt_in)
    loss = torch._dynamo.explain(sequence_loss)(logits, tgt_out, PAD, 0.1)
    assert (loss.graph_count, loss.graph_break_count) == (1, 0), loss.break_reasons
    features = model(src, mask, tgt_in, project=False)

    def halved(h):  # the fused loss inside a traced function: only the halving is traced
        return projected_loss(h, model.out_proj, tgt_out, PAD, 0.1) / 2

    fused = torch._dynamo.explain(halved)(features)
    traced = [n.target for g in fused.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert len(traced) == 1, traced


def test_the_forward_on_packed_rows_traces_without_graph_breaks():
    """trainer.packed_rows with trainer.compile: the forward on packed rows (segment masks,
    positions looked up per token) is one graph too, its ``RowSegments`` an input."""

    model, (src, mask, tgt_in, _) = model_with_dropout()
    b = pack_batch(Batch(src, mask, tgt_in, tgt_in), PAD, 16)  # the same real positions
    assert b.src.shape[0] < src.shape[0]  # several pairs to a row
    forward = torch._dynamo.explain(model)(b.src, b.src_mask, b.tgt_in, False, b.rows)
    assert (forward.graph_count, forward.graph_break_count) == (1, 0), forward.break_reasons


def test_one_compiled_graph_serves_batches_of_every_shape():
    """B, S and T are three symbols of one graph: a first batch with B == S == T, then
    batches with S != T, S a multiple of 16 and not, one graph each for the model and the
    loss (traced through AOTAutograd, forward and backward, without inductor's code
    generation). With torch's duck sizing and the key mask padded to rows of 16, the model
    compiled three graphs for these batches, as a run on an H100 did for its first
    (transformer/compiling.py)."""
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(str(torch._guards.CompileContext.current_compile_id()))
        return lookup_backend("aot_eager")(gm, example_inputs)

    model, _ = model_with_dropout()
    net = compile_dynamic(model, backend=counting)
    loss_of = compile_dynamic(sequence_loss, backend=counting)
    g = torch.Generator().manual_seed(0)
    for B, S, T in [(9, 9, 9), (8, 10, 12), (5, 16, 16), (7, 17, 19), (6, 8, 24), (3, 32, 5)]:
        src = torch.randint(3, V, (B, S), generator=g)
        src[0, S // 2 :] = PAD
        tgt = torch.randint(3, V, (B, T + 1), generator=g)
        loss_of(net(src, src != PAD, tgt[:, :-1]), tgt[:, 1:], PAD, 0.1).backward()
        assert graphs == ["0/0", "1/0"], (B, S, T)  # frame/compile: one compile of each


@pytest.mark.parametrize("rows", [None, 16])
def test_the_trainers_batches_share_no_storage_between_model_inputs(
    compose, small_overrides, tmp_path, rows
):
    """Compiled with duck sizing off, a model whose inputs were views of one tensor failed
    inside torch (transformer/compiling.py): the trainer's batches, padded or in packed
    rows, hand the model inputs that share no storage."""
    trainer = Trainer(compose(small_overrides), tmp_path / "run")
    for idx in trainer.batcher.epoch_batches(0)[:3]:
        b = trainer.batcher.batch(idx)
        inputs = [b.src, b.src_mask, b.tgt_in]
        if rows:
            b = pack_batch(b, trainer.pad_id, rows)
            inputs = [b.src, b.src_mask, b.tgt_in, *b.rows.tensors()]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        assert len(storages) == len(inputs)


def test_the_mask_operator_passes_torchs_operator_checks():
    """torch.library.opcheck: schema, autograd registration, the tracing stand-in against the
    real mask (shape, dtype, strides: a transposed input once had its strides where the real
    mask is contiguous), and tracing through AOTAutograd with dynamic shapes."""
    inputs = (torch.randn(4, 6), torch.randn(4, 6).t(), torch.randn(2, 3, 5).bfloat16())
    for x in inputs:
        torch.library.opcheck(torch.ops.mt_dropout.keep_mask.default, (x, 0.3))


@pytest.mark.slow
def test_compiled_training_draws_each_cpu_dropout_mask_once(monkeypatch):
    """Compiled (inductor), a training step draws as many CPU masks, of the same shapes, as
    an eager step: the backward reuses the forward's masks (a compiler that recomputed the
    mask operator in the backward would drop other elements than the forward did)."""
    torch._dynamo.reset()  # after another test's compiles, tracing failed inside torch
    model, (src, mask, tgt_in, tgt_out) = model_with_dropout()
    draws = count_mask_draws(monkeypatch)

    def step(net):
        sequence_loss(net(src, mask, tgt_in), tgt_out, PAD, 0.1).backward()
        shapes = sorted(tuple(s) for s in draws)
        draws.clear()
        return shapes

    eager = step(model)
    assert len(eager) == 13
    assert step(compile_dynamic(model)) == eager


def test_unknown_compile_mode_names_the_key(compose, small_overrides, tmp_path):
    cfg = compose([*small_overrides, "trainer.compile_mode=fastest"])
    with pytest.raises(TrainingError, match=r"trainer\.compile_mode must be one of default, "):
        Trainer(cfg, tmp_path / "run")


def test_batch_shapes_counts_the_shapes_the_batches_have(compose, small_overrides, tmp_path):
    """The CUDA-graph log line counts shapes from lengths alone; collating every batch of
    epoch 0 must give the same count. On the CPU reduce-overhead records no CUDA graph."""
    cfg = compose(
        [
            *small_overrides,
            "data.max_tokens=128",  # small batches, some of one shape
            "trainer.compile=true",
            "trainer.compile_mode=reduce-overhead",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    plan = trainer.batcher.epoch_batches(0)
    batches = [trainer.batcher.batch(idx) for idx in plan]
    shapes = {(*b.src.shape, b.tgt_out.shape[1]) for b in batches}
    assert 1 < len(shapes) < len(plan)
    assert trainer.batch_shapes() == (len(shapes), len(plan))
    assert not trainer.cuda_graphs
    # packed rows: the shapes of the packed batches, fewer (only the rows vary, mostly)
    trainer.packed_rows = 64
    packed = [pack_batch(b, trainer.pad_id, 64) for b in batches]
    packed = {(*b.src.shape, b.tgt_out.shape[1]) for b in packed}
    assert trainer.batch_shapes() == (len(packed), len(plan))
    assert len(packed) < len(shapes)


def test_each_forward_under_cuda_graphs_starts_a_new_graph_step(
    compose, small_overrides, tmp_path, monkeypatch
):
    """With CUDA graphs, every micro-batch's forward is marked as a new step (the outputs of
    the previous replay were consumed by then), also under gradient accumulation."""
    marks = []
    monkeypatch.setattr(Trainer, "cuda_graphs", property(lambda self: True))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = compose([*small_overrides, "trainer.max_steps=3", "trainer.accum_steps=2"])
    assert train(cfg)["steps"] == 3
    assert len(marks) == 6


@pytest.mark.parametrize("accum", [1, 2])
def test_gradients_outlive_the_graph_replay_that_made_them(
    compose, small_overrides, tmp_path, monkeypatch, accum
):
    """Under CUDA graphs the backward's gradients are the graph's output buffers, handed to
    ``.grad`` without a copy, and the next replay writes into the same memory. Simulated on
    the CPU: at each step mark, every gradient the previous backward installed is
    overwritten with NaN. Training must still end with the weights of a run without graphs,
    with gradient accumulation too (the first micro-batch's gradients outlive a replay)."""
    installed = []  # the gradients as the last backward left them

    def overwrite():
        for g in installed:
            g.fill_(float("nan"))
        installed.clear()

    weights = {}
    for graphs in (False, True):
        if graphs:
            monkeypatch.setattr(Trainer, "cuda_graphs", property(lambda self: True))
            monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", overwrite)
        run = tmp_path / f"run-{graphs}"
        overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
        cfg = compose(
            [*overrides, f"run_dir={run}", "trainer.max_steps=3", f"trainer.accum_steps={accum}"]
        )
        trainer = Trainer(cfg, run)
        if graphs:
            for p in trainer.model.parameters():
                p.register_post_accumulate_grad_hook(lambda p: installed.append(p.grad))
        trainer.run()
        weights[graphs] = trainer.model.state_dict()
    for name, w in weights[False].items():
        assert torch.equal(weights[True][name], w), name


def test_cuda_graphs_is_on_for_exactly_the_modes_where_torch_records_them(
    compose, small_overrides, tmp_path
):
    cfg = compose([*small_overrides, "trainer.compile=true"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.device = torch.device("cuda")  # only read by the property; nothing runs there
    options = torch._inductor.list_mode_options()
    for mode in COMPILE_MODES:
        trainer.compile_mode = mode
        assert trainer.cuda_graphs == bool(options[mode].get("triton.cudagraphs")), mode
