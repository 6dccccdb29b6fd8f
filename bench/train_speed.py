"""Training throughput of our models against Hugging Face Marian of the same size.

    python bench/train_speed.py [--device cuda] [--out results/bench/NAME.md]

For each config (the Multi30k default Transformer, and Transformer-base: d_model 512, 6+6
layers, 8 heads, FFN 2048) and each token budget per batch, the same real Multi30k de->en
batches (length-bucketed as in training) are fed to our model and to a ``MarianMTModel``
built from a ``MarianConfig`` of identical size (random weights, no download). Reported:
target tokens/s, step time, peak memory, and model FLOPs utilisation (MFU): FLOPs counted
analytically for the sentence pairs at their own lengths (matrix multiplies only, forward
x 3 for training), divided by the step time and the stated peak, and on the padded batch
shapes as "MFU (padded)". The RNN's tokens/s is measured on the same
batches. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402

from transformer import dropout  # noqa: E402
from transformer.attention import KINDS as ATTENTION_KINDS  # noqa: E402
from transformer.attention import use_sdpa_backends  # noqa: E402
from transformer.compiling import compile_dynamic  # noqa: E402
from transformer.data import DataError, EncodedSplit, TokenBatcher  # noqa: E402
from transformer.host_memory import reuse_freed_memory  # noqa: E402
from transformer.loss import projected_loss, sequence_loss  # noqa: E402
from transformer.packing import pack_batch  # noqa: E402
from transformer.precision import Bf16Weights  # noqa: E402
from transformer.rnn_model import BahdanauRNN  # noqa: E402
from transformer.run_data import prepare_data  # noqa: E402
from transformer.settings import COMPILE_MODES, CUDA_GRAPH_MODES, cpu_model  # noqa: E402
from transformer.transformer_model import Transformer  # noqa: E402

CONFIGS = {
    "multi30k-default": dict(d_model=256, n_heads=4, d_ff=1024, n_enc_layers=3, n_dec_layers=3),
    "transformer-base": dict(d_model=512, n_heads=8, d_ff=2048, n_enc_layers=6, n_dec_layers=6),
}
DROPOUT = dict(dropout=0.3, attn_dropout=0.1, act_dropout=0.1)
# Dense bf16 datasheet figures, the first name found in the device's wins: the PCIe and NVL
# parts are slower than the SXM ones that "H100" / "H200" alone stand for
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12,
             "H200": 989e12}  # fmt: skip


def peak_flops(device_name: str, precision: str) -> float | None:
    """The dense bf16 peak MFU divides by; None for another GPU, or for fp32 (no bf16)."""
    if precision == "fp32":
        return None
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and its bf16 matrix units (the speed of bf16 on
    a CPU depends on them: AMX-bf16, or AVX-512 bf16 dot products)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    name = cpu_model()
    return f"{name} ({', '.join(units)})" if units else name


def marian(cfg: dict, vocab: int, pad: int, bos: int, eos: int, dropout: dict = DROPOUT):
    from transformers import MarianConfig, MarianMTModel

    mc = MarianConfig(
        vocab_size=vocab,
        d_model=cfg["d_model"],
        encoder_layers=cfg["n_enc_layers"],
        decoder_layers=cfg["n_dec_layers"],
        encoder_attention_heads=cfg["n_heads"],
        decoder_attention_heads=cfg["n_heads"],
        encoder_ffn_dim=cfg["d_ff"],
        decoder_ffn_dim=cfg["d_ff"],
        dropout=dropout["dropout"],
        attention_dropout=dropout["attn_dropout"],
        activation_dropout=dropout["act_dropout"],
        activation_function="relu",
        max_position_embeddings=1024,
        pad_token_id=pad,
        decoder_start_token_id=bos,
        eos_token_id=eos,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    return MarianMTModel(mc)


class MarianAdapter(torch.nn.Module):
    """Marian behind our forward(src, src_mask, tgt_in) -> logits signature."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src, src_mask, tgt_in):
        # use_cache=False: HF turns its decoding cache off only when given labels; with it on,
        # every training step also copied each decoder layer's keys and values into a cache
        # (24 concatenations a Transformer-base step, 1.9 of 70.9 ms on the H100, in the
        # tables made before 2026-12-03)
        return self.model(
            input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt_in, use_cache=False
        ).logits


def build_model(
    name: str, cfg: dict, vocab: int, pad: int, bos: int, eos: int, dropout: dict = DROPOUT
):
    """Our Transformer ("ours") or HF Marian ("marian") of the layout ``cfg`` with the
    benchmarks' dropout (or ``dropout``) and random weights, behind our forward signature.
    Another name is an error: it built Marian, timed under the name it was given."""
    if name == "ours":
        return Transformer(vocab, vocab, pad, **cfg, **dropout)
    if name == "marian":
        return MarianAdapter(marian(cfg, vocab, pad, bos, eos, dropout))
    raise ValueError(f"unknown model {name!r}: ours or marian")


def flops_by_part(cfg: dict, B: int, S: int, T: int, vocab: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of one training step (forward + backward = 3 x forward), split
    into the products with weights ("linear": the projections, FFNs and the output projection)
    and those of attention ("attention": scores and weighted sums, self and cross)."""
    d, f = cfg["d_model"], cfg["d_ff"]
    linear = (
        cfg["n_enc_layers"] * B * S * (4 * d * d + 2 * d * f)
        + cfg["n_dec_layers"] * (B * T * (6 * d * d + 2 * d * f) + B * S * 2 * d * d)
        + B * T * d * vocab
    )  # decoder: self q,k,v,o; cross q,o; FFN; cross k, v over the source
    attention = cfg["n_enc_layers"] * 2 * B * S * S * d + cfg["n_dec_layers"] * (
        2 * B * T * T * d + 2 * B * T * S * d
    )
    return {"linear": 3 * 2 * linear, "attention": 3 * 2 * attention}


def train_flops(cfg: dict, B: int, S: int, T: int, vocab: int) -> float:
    """Matrix-multiply FLOPs of one training step (forward + backward = 3 x forward)."""
    return sum(flops_by_part(cfg, B, S, T, vocab).values())


def real_flops_by_part(cfg: dict, batch, pad: int, vocab: int) -> dict[str, float]:
    """``flops_by_part`` of a batch's sentence pairs at their own lengths, without padding."""
    src_lens = batch.src_mask.sum(1).tolist()
    tgt_lens = (batch.tgt_in != pad).sum(1).tolist()  # BOS + y: as many as y + EOS
    parts = [flops_by_part(cfg, 1, s, t, vocab) for s, t in zip(src_lens, tgt_lens)]
    return {k: sum(p[k] for p in parts) for k in ("linear", "attention")}


def real_flops(cfg: dict, batch, pad: int, vocab: int) -> float:
    """``train_flops`` of a batch's sentence pairs at their own lengths: the model FLOPs of
    MFU as usually defined (the padded shapes' count is ``train_flops``)."""
    return sum(real_flops_by_part(cfg, batch, pad, vocab).values())


def make_step(model, pad, device, precision, compile=None, fused_loss=False):
    """One training update (forward, label-smoothed loss, backward, clip, fused AdamW) as
    the trainer does it; ``precision``: bf16 (autocast), fp32, or bf16-weights (the
    forward and backward on a bf16 copy, the update on the fp32 model's flat buffer:
    ``trainer.precision=bf16-weights``, transformer/precision.py; our models only);
    ``compile``: None (eager) or a torch.compile mode, the model and (apart from it) the
    unfused loss through torch.compile(dynamic=True, mode=...) as with
    ``trainer.compile=true`` and ``trainer.compile_mode`` (the fused loss runs eagerly);
    ``fused_loss``: the output projection fused into the loss (``trainer.fused_loss``; our
    models only)."""
    params = list(model.parameters())  # listed once, as the trainer does
    mixed = Bf16Weights(model) if precision == "bf16-weights" else None
    # as the trainer: fused AdamW, with bf16-weights over the flat fp32 buffer
    opt = torch.optim.AdamW(
        mixed.params_for(torch.optim.AdamW) if mixed else params, lr=1e-4, fused=True
    )
    plain = (mixed.compute if mixed else model).train()
    dtype = torch.bfloat16 if precision == "bf16" else None
    net, token_loss = plain, sequence_loss
    if compile:  # as the trainer: the model, and apart from it the unfused loss
        net = compile_dynamic(plain, compile)
        token_loss = compile_dynamic(sequence_loss, compile)

    def loss_of(src, src_mask, tgt_in, tgt_out, rows, src_lengths):
        extra = {} if rows is None else {"rows": rows}  # packed rows: ours only
        if src_lengths is not None:  # the RNN's, counted on the host (on_device)
            extra["src_lengths"] = src_lengths
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if fused_loss:
                features = net(src, src_mask, tgt_in, project=False, **extra)
                return projected_loss(features, plain.out_proj, tgt_out, pad, 0.1)
            logits = net(src, src_mask, tgt_in, **extra)
            return token_loss(logits, tgt_out, pad, 0.1)

    graphs = compile in CUDA_GRAPH_MODES and device.type == "cuda"

    def step(b):
        if graphs:  # as the trainer: the last replay's outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        rows, lengths = getattr(b, "rows", None), getattr(b, "src_lengths", None)
        loss = loss_of(b.src, b.src_mask, b.tgt_in, b.tgt_out, rows, lengths)
        (loss / 1000).backward()
        if mixed:  # as the trainer: gradients gathered and clipped on the flat buffer
            mixed.gather_grads()
            mixed.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mixed:
            mixed.publish()

    return step


def on_device(batch, device, pad: int, rows: int = 0, host_lengths: bool = False):
    """``batch`` copied to ``device``, in packed rows of width ``rows`` where given; with
    ``host_lengths`` (a model that takes ``src_lengths``: the RNN) its source lengths
    counted on the host ride along (``src_lengths``, on the CPU), as the trainer hands
    them to the model."""
    moved = (pack_batch(batch, pad, rows) if rows else batch).to(device)
    if host_lengths:
        moved.src_lengths = batch.src_mask.sum(dim=1)
    return moved


def load_batches(max_tokens: int, n: int, join: int = 1):
    """The first ``n`` length-bucketed Multi30k de->en training batches of ``max_tokens``
    tokens (epoch 0, seed 1) and the tokenizer; with ``join`` > 1, batches of the training
    pairs joined ``join`` at a time (``join_pairs``)."""
    train, tok = training_pairs(join)
    specials = (tok.pad_id, tok.bos_id, tok.eos_id)
    batcher = TokenBatcher(train, max_tokens, 1, specials, budget="--max-tokens")
    return [batcher.batch(i) for i in batcher.epoch_batches(0)[:n]], tok


@functools.cache
def training_pairs(join: int):
    """The encoded Multi30k de->en training split (joined ``join`` at a time) and the
    tokenizer, read once per process: ``main`` checks every token budget against the data
    before timing, then makes each configuration's batches."""
    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf):
        cfg = compose("train", overrides=["run_dir=/tmp/bench-run", "data.test_splits=[]"])
    splits, _, tok, _ = prepare_data(cfg, Path("/tmp/bench-run"))
    return join_pairs(splits["train"], join), tok


def join_pairs(split: EncodedSplit, k: int) -> EncodedSplit:
    """``split``'s pairs joined ``k`` at a time in corpus order: each side's ids of pairs
    i*k ... i*k+k-1 concatenated into one pair (a remainder of fewer than k left out), so
    sentences are about k times as long. Multi30k's average 17 subwords a sentence; WMT's
    are longer, and attention's share of a step grows with the length (``--join``)."""
    if k == 1:
        return split
    n = len(split) // k * k
    src, tgt = split.rows(np.arange(n))

    def joined(side):
        return [np.concatenate(side[i : i + k]) for i in range(0, n, k)]

    return EncodedSplit.from_lists(joined(src), joined(tgt))


def add_malloc_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--malloc",
        choices=["reuse", "default"],
        default="reuse",
        help="CPU: glibc malloc keeps freed memory for reuse (trainer.cpu_malloc_reuse=true, "
        "as the trainer) or runs with glibc's defaults (false)",
    )


def apply_malloc(choice: str, device: torch.device) -> bool:
    """``--malloc``, as ``trainer.cpu_malloc_reuse``: on the CPU, ``reuse`` sets glibc's malloc
    to keep freed memory; True if it did."""
    wanted = device.type == "cpu" and choice == "reuse"
    reuse = wanted and reuse_freed_memory()
    if wanted and not reuse:
        print("glibc's mallopt is not available here: malloc runs with its defaults")
    return reuse


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process so far (torch's own count); 0
    while Dynamo is not imported (an eager run does not pay its import to learn that)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.utils.counters["stats"]["unique_graphs"] if dynamo else 0


def warm_passes(compile, device) -> int:
    """Untimed passes over the timed batches before timing them: 2 where ``compile`` is a
    CUDA-graph mode on CUDA (a shape's graph is recorded at its second use), else 1. With one
    pass the H200 run of 2026-12-04 timed the recording of each shape's graphs."""
    return 2 if compile in CUDA_GRAPH_MODES and device.type == "cuda" else 1


class Timing:
    """One model's training steps on the timed batches: warmed up when built, then timed in
    one go, or in chunks that alternate with the other models' (``--rounds``), so that a
    change in the machine's load hits every model alike. ``setup`` sets the process-wide
    switches this model runs with (dropout mask, SDPA kernels) before each chunk."""

    def __init__(self, model, batches, pad, device, precision, steps, warmup, compile, fused,
                 setup, rows=None, held=0, device_lengths=False):  # fmt: skip
        """``rows``: feed the batches in packed rows of this width (packing.pack_batch); the
        FLOPs (MFU) stay counted on the padded batches, as for every model. ``held``: the
        device memory allocated before ``model`` was built (other models kept for their
        rounds), which its peak leaves out. ``device_lengths``: a model that takes
        ``src_lengths`` (the RNN) counts them from the device's mask instead, and copies
        them back at every step (the ablation of the host's lengths)."""
        self.pad, self.device, self.setup = pad, device, setup
        setup()
        compiled_before = graphs_compiled()
        self.step = make_step(model, pad, device, precision, compile, fused)
        self.counted = batches[warmup : warmup + steps]
        host_lengths = getattr(model, "takes_src_lengths", False) and not device_lengths
        on_dev = [on_device(b, device, pad, rows, host_lengths) for b in batches]
        self.timed = on_dev[warmup : warmup + steps]
        # Warm up on every timed batch shape too: the first use of a shape loads and picks
        # kernels (hundreds of ms on a GPU), which is start-up cost, not throughput. Through
        # CUDA graphs twice: CUDA Graph Trees run each new function (under dynamic shapes,
        # one per batch shape) eagerly once to warm it up and record it on its second call,
        # and only the third replays (torch/_inductor/cudagraph_trees.py). The first step
        # is timed on its own: compiling, or eager start-up, is what it adds.
        passes = warm_passes(compile, device)
        first, *rest = on_dev[:warmup] + self.timed * passes
        t0 = time.perf_counter()
        self.step(first)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.first_s = time.perf_counter() - t0
        for b in rest:
            self.step(b)
        # graphs compiled (model and loss) before timing, and while timed: a compiled model
        # that met a new batch shape and traced again would count here, timed
        self.compiled = (graphs_compiled() - compiled_before, 0) if compile else None
        # What this model keeps between steps (weights, optimizer state, its batches): its
        # peak is that plus the most its steps allocate on top, whoever else holds memory.
        self.resident = self.peak = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
            self.resident = self.peak = torch.cuda.memory_allocated() - held
        self.times, self.tokens, self.done, self.faults = [], 0, 0, 0
        self.round_s = []  # seconds of each ``run``: a round with --rounds

    def run(self, n: int) -> None:
        """Time the next ``n`` steps."""
        self.setup()
        cuda = self.device.type == "cuda"
        if cuda:
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        compiled_before = graphs_compiled()
        for b in self.timed[self.done : self.done + n]:
            t0 = time.perf_counter()
            self.step(b)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - t0)
            self.tokens += int((b.tgt_out != self.pad).sum())
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        if self.compiled:
            warm, timed = self.compiled
            self.compiled = (warm, timed + graphs_compiled() - compiled_before)
        if cuda:
            grew = torch.cuda.max_memory_allocated() - start
            self.peak = max(self.peak, self.resident + grew)
        self.round_s.append(sum(self.times[self.done :]))
        self.done += n

    def result(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "tok_s": self.tokens / sum(self.times),
            "step_ms": 1000 * statistics.median(self.times),
            "peak_gib": self.peak / 2**30 if cuda else None,  # CUDA's allocator counts it
            "seconds": sum(self.times),
            "faults": self.faults / len(self.times),
            "first_s": self.first_s,
            "compiled": self.compiled,
            "round_s": self.round_s,
            # the batches timed so far: with --rounds a table saved between rounds divided the
            # FLOPs of all the batches by the seconds of the rounds done (its MFU too high)
            "batches": self.counted[: len(self.times)],
        }


def load_checked(ap: argparse.ArgumentParser, max_tokens: int, n: int, join: int = 1):
    """``load_batches``, with a token budget below the longest training example as ``ap``'s
    usage error (before any timing), not a traceback."""
    try:
        return load_batches(max_tokens, n, join=join)
    except DataError as e:
        ap.error(str(e))


def make_parser() -> argparse.ArgumentParser:
    """The options; each value is checked as it is parsed (bench/arguments.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--device", type=arguments.device, default="auto", help="auto, cpu, cuda or cuda:N"
    )
    ap.add_argument(
        "--configs",
        type=arguments.names(CONFIGS),
        default=",".join(CONFIGS),
        help=f"comma-separated, of {', '.join(CONFIGS)}",
    )
    ap.add_argument("--max-tokens", type=arguments.counts(1), default="4096,8192,25000")
    ap.add_argument("--steps", type=arguments.count(1), default=30)
    ap.add_argument("--warmup", type=arguments.count(0), default=5)
    ap.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="on a GPU: bf16 autocast or fp32 (the CPU runs fp32)",
    )
    ap.add_argument("--rnn", action="store_true", help="also time the Bahdanau RNN")
    ap.add_argument(
        "--compile", action="store_true", help="also time both through torch.compile(dynamic=True)"
    )
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode for the compiled models (trainer.compile_mode; "
        "reduce-overhead: CUDA graphs, one recorded per batch shape)",
    )
    ap.add_argument(
        "--compiled-only",
        action="store_true",
        help="time only the compiled models (with each --sdpa setting, or torch's kernels)",
    )
    ap.add_argument(
        "--kinds",
        type=arguments.names(ATTENTION_KINDS, empty=True),
        default="",
        help="also time ours with these model.attention.kind values (comma-separated)",
    )
    ap.add_argument(
        "--fused-loss",
        choices=["auto", "true", "false"],
        default="auto",
        help="ours with the projection fused into the loss (auto: on the CPU, as the trainer)",
    )
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also time ours without the fused loss and with torch's bernoulli CPU dropout, "
        "and (--rnn) the RNN counting its source lengths from the device's mask",
    )
    ap.add_argument(
        "--bf16-weights",
        action="store_true",
        help="also time ours with trainer.precision=bf16-weights: the forward and backward "
        "on a bf16 copy without autocast, fused AdamW on the fp32 model (precision.py); "
        "eager, and in each compiled mode timed; with --packed-rows, also in rows",
    )
    ap.add_argument(
        "--packed-rows",
        type=arguments.counts(1, empty=True),
        default="",
        help="also time ours on the same batches laid out several pairs to a row of W slots "
        "(comma-separated widths; transformer/packing.py): eager with torch's SDPA kernels, "
        "and in each compiled mode timed",
    )
    ap.add_argument(
        "--sdpa",
        type=arguments.sdpa_settings,
        default="",
        help="also time ours and Marian with only these SDPA kernels allowed (comma-separated "
        "settings, each one or more of flash, efficient, cudnn, math joined by +; "
        "trainer.sdpa_backends)",
    )
    ap.add_argument(
        "--rounds",
        type=arguments.count(1),
        default=1,
        help="time the models of a batch size in this many alternating rounds of "
        "steps/rounds steps each (all models stay built), so that load drift hits all alike "
        "(on a GPU each model's peak memory leaves the others' out; not through CUDA graphs)",
    )
    ap.add_argument(
        "--models",
        type=arguments.free_names,
        default="",
        help="time only these of the models the other options make (comma-separated table "
        "names, e.g. 'ours/rows-128/bf16-weights+compile/sdpa=efficient'), each with the "
        "Marian it is compared with",
    )
    add_malloc_option(ap)
    add_join_option(ap)
    ap.add_argument("--out", type=arguments.out_file, help="the table's file (not a folder)")
    return ap


def add_join_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--join",
        type=arguments.count(1),
        default=1,
        help="batches of the training pairs joined this many at a time, in corpus order: "
        "sentences about that many times as long as Multi30k's (1: its own)",
    )


def batches_said(join: int) -> str:
    """The tables' words for ``load_batches``' batches."""
    import sentencepiece

    # (SentencePiece 0.2.2, on the GPU machines, cuts Multi30k into other pieces than 0.2.3:
    # epoch 0 has 20 batches of 25k tokens there, 21 here)
    said = (
        "real Multi30k de->en training batches, length-bucketed, tokenized by SentencePiece "
        f"{sentencepiece.__version__}"
    )
    if join > 1:
        said += (f", of the training pairs joined {join} at a time in corpus order (each side's "
                 f"ids concatenated: sentences about {join}x as long)")  # fmt: skip
    return said


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``ap``'s options, and those that go together checked (not yet against the data)."""
    args = ap.parse_args(argv)
    graphs = args.compile_mode in CUDA_GRAPH_MODES and (args.compile or args.compiled_only)
    if args.rounds > 1 and graphs:
        # each model's graphs are recorded into one memory pool per device; interleaving
        # the models' replays is untried, and a re-recording would be timed
        ap.error(f"--rounds must be 1 with --compile-mode {args.compile_mode} (CUDA graphs)")
    if args.rounds > args.steps:  # a round of no steps: a ratio divided by 0 after timing
        ap.error(f"--rounds {args.rounds} is more than --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    ap = make_parser()
    args = parse_args(ap, argv)
    device = args.device
    precision = args.precision if device.type == "cuda" else "fp32"
    fused = args.fused_loss == "true" or (args.fused_loss == "auto" and device.type == "cpu")
    for max_tokens in args.max_tokens:  # each budget against the data, before any timing
        _, tok = load_checked(ap, max_tokens, 0, args.join)
    made = {n for c in args.configs for n in models_to_time(args, c, CONFIGS[c], tok, fused)}
    unknown = [n for n in args.models if n not in made]
    if unknown:  # before any timing
        ap.error(f"--models: {', '.join(unknown)} not among the models these options make: "
                 f"{', '.join(sorted(made))}")  # fmt: skip
    reuse = apply_malloc(args.malloc, device)
    name = machine(device)
    peak = peak_flops(name, precision)
    lines = header(args, argv, name, precision, fused, reuse, peak)
    table_at = len(lines) - 3  # notes about a config's batches go before the table
    for cname in args.configs:
        mcfg = CONFIGS[cname]
        for max_tokens in args.max_tokens:
            batches, _ = load_batches(max_tokens, args.warmup + args.steps, args.join)
            if len(batches) < args.warmup + args.steps:  # an epoch of fewer, larger batches
                timed = max(0, len(batches) - args.warmup)
                note = (f"- {cname} at {max_tokens} tokens: epoch 0 has {len(batches)} batches, "
                        f"so {timed} timed steps, not {args.steps}")  # fmt: skip
                sizes = round_sizes(timed, args.rounds)
                if args.rounds > 1 and sizes:
                    note += f" ({min(sizes)}-{max(sizes)} per round, in {len(sizes)} rounds)"
                lines.insert(table_at, note)
                table_at += 1
            torch.manual_seed(0)
            models = only_models(models_to_time(args, cname, mcfg, tok, fused), args.models)
            group = f"{cname} {max_tokens}"
            rows_of = functools.partial(
                table_rows, models, cname=cname, max_tokens=max_tokens, mcfg=mcfg, V=len(tok),
                pad=tok.pad_id, peak=peak,
            )  # fmt: skip
            rows = time_models(args, models, batches, tok.pad_id, precision, fused, group,
                               rows_of, lines)  # fmt: skip
            lines += rows
            print("\n".join(rows), flush=True)
            arguments.save(args.out, lines, done=False)  # a run stopped later keeps them
    arguments.save(args.out, lines, done=True)
    print("\n".join(lines))


def header(args, argv, name: str, precision: str, fused: bool, reuse: bool,
           peak: float | None) -> list[str]:  # fmt: skip
    """The table's title, the notes on what was measured and how, and its heading."""
    device = args.device
    return [
        f"# Training throughput: ours vs HF Marian ({name})",
        "",
        f"- device: {name}; torch {torch.__version__}; precision {precision}; "
        f"{os.cpu_count()} CPU threads",
        f"- command: `python bench/train_speed.py {arguments.given(argv)}`",
        f"- batches: {batches_said(args.join)}; "
        f"{args.steps} timed steps each, after {args.warmup} warm-up steps plus one untimed "
        "pass over the timed batches (first use of a shape is kernel start-up cost; two "
        "passes through CUDA graphs, which record a shape's graph at its second use); "
        + (
            f"timed in {args.rounds} rounds that alternate between the models (each model "
            f"{args.steps // args.rounds}-{-(-args.steps // args.rounds)} steps per round"
            + (
                "; peak GiB: what a model keeps between steps plus the most its steps "
                "allocate, the other models' memory left out"
                if device.type == "cuda"
                else ""
            )
            + "); "
            if args.rounds > 1
            else ""
        )
        + "dropout 0.3/0.1/0.1; fused AdamW; label-smoothed CE; "
        f"ours: output projection fused into the loss: {fused} (`trainer.fused_loss`), "
        "CPU dropout masks from 15-bit slices of 64-bit random draws (transformer/dropout.py)",
        "- ablations, each compared with plain Marian (`--ablate`): ours/unfused-loss "
        "(ours/fused-loss where it is off) = the other setting of `trainer.fused_loss`; "
        "ours/bernoulli-dropout (CPU) = torch's own CPU dropout mask (compiled: "
        "`F.dropout` traced, its mask drawn inside inductor's kernels, instead of our mask "
        "as an operator the compiler calls; compared with Marian in the same mode); "
        "rnn/lengths-from-device (`--rnn`) = the RNN counting its source lengths from the "
        "device's mask and copying them back at every step, instead of taking the host's; "
        "(`--bf16-weights`) "
        "ours/bf16-weights = `trainer.precision=bf16-weights` (the forward and backward on "
        "a bf16 copy without autocast, fused AdamW on the fp32 model; transformer/precision.py); "
        "(`--packed-rows W`) ours/rows-W = the same batches, their pairs laid out several to "
        "a row of W slots, kept apart by a block-diagonal attention mask "
        "(transformer/packing.py); its MFU (padded) counts the FLOPs of the padded batches, "
        "as for every other row; ours/rows-W/bf16-weights = both options",
        "- MFU: the matrix-product FLOPs of the sentence pairs at their own lengths (forward "
        "x 3), per second, over the peak; MFU (padded): of the padded batch shapes, which "
        "counts the padding's products as useful (the tables before 2026-12-03 gave only this "
        "one, as MFU)",
        "- modes: +compile = the model and, apart from it, the unfused loss through "
        "torch.compile(dynamic=True"
        + ("" if args.compile_mode == "default" else f", mode={args.compile_mode!r}")
        + "), as `trainer.compile=true` (the fused loss runs eagerly); "
        "/sdpa=X = only the SDPA kernels X (and math, the fallback) allowed, for both models "
        "(`trainer.sdpa_backends`); ours is compared with Marian in the same mode",
        "- host memory: "
        + (
            "glibc malloc keeps freed memory for reuse (`trainer.cpu_malloc_reuse=true`, as the "
            "trainer; transformer/host_memory.py)"
            if reuse
            else "malloc with its default settings ("
            + ("`trainer.cpu_malloc_reuse=false`)" if device.type == "cpu" else "as the trainer)")
        )
        + "; page faults = minor page faults of the process per timed step",
        "- first step s = the wall time of a model's first training step: compiling it "
        "(+compile rows), or loading and picking kernels (eager), before any timed step",
        "- graphs = the graphs Dynamo compiled for a compiled model (its model and its loss "
        "function) before the timed steps, and in brackets during them (+0: no batch of the "
        "timed ones made it compile again)",
        "- ours / Marian: target tokens/s over all timed steps"
        + (
            "; in brackets the lowest and the highest ratio of a single round (each round "
            "times the same batches for both), which shows how far the machine's load moves it"
            if args.rounds > 1
            else ""
        ),
        f"- MFU peak: {peak / 1e12:.0f} TFLOP/s dense bf16 (datasheet)"
        if peak
        else "- MFU: no peak figure for this device",
        "",
        "| config | max tokens | model | tgt tok/s | step ms (median) | peak GiB | "
        "page faults | first step s | graphs | MFU | MFU (padded) | ours / Marian (same mode) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def models_to_time(args, cname: str, mcfg: dict, tok, fused: bool) -> dict:
    """name -> (build, options) of the models timed for config ``cname`` (``mcfg``), in
    the table's order. A name's mode is what follows the model ("+compile", "/sdpa=..."),
    and ours is compared with Marian in the same mode; pairs are listed next to each other
    and options after their pair, so that a time limit cuts the last ones first."""
    device = args.device
    V, pad = len(tok), tok.pad_id
    ids = (V, pad, tok.bos_id, tok.eos_id)

    def ours():
        return build_model("ours", mcfg, *ids)

    def theirs():
        return build_model("marian", mcfg, *ids)

    models = {}

    def add_rows(mode: str, opt: dict) -> None:
        """Ours in packed rows of each width in mode ``mode`` (options ``opt``), and with
        bf16-weights too (the fastest setting on an H200), compared with Marian in it."""
        for width in args.packed_rows:
            rows = {**opt, "rows": width, "compare_to": "marian" + mode}
            models[f"ours/rows-{width}" + mode] = (ours, rows)
            if args.bf16_weights:
                both = {**rows, "precision": "bf16-weights"}
                models[f"ours/rows-{width}/bf16-weights" + mode] = (ours, both)

    eager = [] if args.compiled_only else [None, *args.sdpa]  # None: torch's pick
    compiled = (args.sdpa or [None]) if args.compiled_only else []
    if args.compile:
        compiled = [None, *args.sdpa]
    for sdpa in eager:
        mode = f"/sdpa={sdpa}" if sdpa else ""
        models["ours" + mode] = (ours, {"sdpa": sdpa})
        models["marian" + mode] = (theirs, {"sdpa": sdpa})
        add_rows(mode, {"sdpa": sdpa})  # next to its pair: a time limit cuts the last
    for sdpa in compiled:
        mode = "+compile" + ("" if args.compile_mode == "default" else f":{args.compile_mode}")
        mode += f"/sdpa={sdpa}" if sdpa else ""
        opt = {"compile": args.compile_mode, "sdpa": sdpa}
        models["ours" + mode], models["marian" + mode] = (ours, opt), (theirs, opt)
        if args.bf16_weights:  # after the pair: a time limit cuts it first
            bf16w = {**opt, "precision": "bf16-weights", "compare_to": "marian" + mode}
            models["ours/bf16-weights" + mode] = (ours, bf16w)
        add_rows(mode, opt)
        if args.ablate and device.type == "cpu":  # F.dropout traced, as before
            no_rand = {**opt, "rand_mask": False, "compare_to": "marian" + mode}
            models["ours/bernoulli-dropout" + mode] = (ours, no_rand)
    # ablations: ours with one thing changed, compared with plain (eager) Marian
    if args.ablate:
        models[f"ours/{'unfused' if fused else 'fused'}-loss"] = (
            ours, {"fused": not fused, "ablation": True}
        )  # fmt: skip
        if device.type == "cpu":
            models["ours/bernoulli-dropout"] = (ours, {"rand_mask": False, "ablation": True})
    if args.bf16_weights and not args.compiled_only:
        models["ours/bf16-weights"] = (ours, {"precision": "bf16-weights", "ablation": True})
    if args.rnn and cname == "multi30k-default":
        models["rnn"] = (lambda: BahdanauRNN(V, V, pad), {})
        if args.ablate:  # as before 2026-12-04: the lengths counted from the device mask
            models["rnn/lengths-from-device"] = (
                lambda: BahdanauRNN(V, V, pad), {"device_lengths": True}
            )  # fmt: skip
    for kind in args.kinds:
        if kind != "scaled_dot":
            models[f"ours/{kind}"] = (
                lambda k=kind: Transformer(V, V, pad, **mcfg, **DROPOUT, attention={"kind": k}),
                {"kind": kind},
            )
    return models


def time_models(args, models: dict, batches, pad: int, precision: str, fused: bool,
                group: str, rows_of, head: list[str]) -> list[str]:  # fmt: skip
    """Time ``models`` on ``batches``, one after the other, or (``--rounds``) each warmed
    up first and then timed in rounds that alternate between them; returns their table
    rows (``rows_of(measured)``). After every model or round the table so far (``head``
    and these rows) is saved as incomplete: a device call stopped by its time limit
    (compiling takes minutes per model) keeps what was measured. A model that fails (out
    of memory, a compiler or kernel error) is left out, and the others still run."""
    device = args.device

    def save_partial(rows: list[str]) -> None:
        arguments.save(args.out, head + rows, done=False)

    measured, alive = {}, {}  # results; Timings waiting for their rounds (--rounds)
    for mname, (build, opt) in models.items():

        def setup(opt=opt):
            dropout.RAND_MASK_ON_CPU = opt.get("rand_mask", True)
            use_sdpa_backends(opt["sdpa"].split("+") if opt.get("sdpa") else None, device)

        held = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        model = build().to(device)
        ours_fused = opt.get("fused", fused) and mname.startswith("ours")
        try:
            timing = Timing(
                model, batches, pad, device, opt.get("precision", precision),
                args.steps, args.warmup, opt.get("compile"), ours_fused, setup,
                rows=opt.get("rows"), held=held, device_lengths=opt.get("device_lengths", False),
            )  # fmt: skip
            if args.rounds == 1:
                timing.run(args.steps)
        except Exception as e:  # out of memory, a compiler or kernel error: the others run
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"failed: {type(e).__name__}: {first}"
            if isinstance(e, torch.OutOfMemoryError):
                why = f"out of memory: {e}"
            print(f"{group} {mname}: {why}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        finally:
            use_sdpa_backends(None, device)
        if args.rounds > 1:
            alive[mname] = timing
            continue
        measured[mname] = r = timing.result()  # and free this model before the next
        print(f"{group} {mname}: {r['tok_s']:,.0f} tgt tok/s, {r['step_ms']:.1f} ms/step",
              flush=True)  # fmt: skip
        save_partial(rows_of(measured))
        del model, timing
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = len(batches[args.warmup : args.warmup + args.steps])  # fewer in a short epoch
    for n in round_sizes(timed, args.rounds) if alive else []:
        for timing in alive.values():
            timing.run(n)
        so_far = {mname: timing.result() for mname, timing in alive.items()}
        save_partial(rows_of(measured | so_far))  # the steps of the rounds done
    use_sdpa_backends(None, device)
    measured.update((mname, timing.result()) for mname, timing in alive.items())
    return rows_of(measured)


def round_sizes(steps: int, rounds: int) -> list[int]:
    """The steps of each of ``rounds`` rounds over ``steps`` timed steps, as even as they can
    be; a round of none left out (fewer timed steps than rounds). Split by --steps instead,
    an epoch of fewer batches (17 timed of 20 at 25k tokens) had a short last round (5, 5, 5,
    2 steps, not the header's 5-5) and, with more rounds than timed steps, rounds of no steps
    whose ratio divided 0 by 0 after the timing."""
    bounds = [steps * i // rounds for i in range(rounds + 1)]
    return [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def peer(mname: str, opt: dict) -> str | None:
    """The Marian that ours ``mname`` (with options ``opt``) is compared with: Marian in the
    same mode, plain Marian for an ablation; None for Marian, the RNN and other kinds."""
    if not mname.startswith("ours") or "kind" in opt:
        return None
    same_mode = "marian" + ("" if opt.get("ablation") else mname.removeprefix("ours"))
    return opt.get("compare_to", same_mode)


def only_models(models: dict, wanted: list[str]) -> dict:
    """``models`` cut to the names ``wanted`` (all of them where none is) and the Marian each
    is compared with, in the table's order."""
    if not wanted:
        return models
    keep = {n for n in wanted if n in models}
    keep |= {peer(n, models[n][1]) for n in keep} - {None}
    return {n: m for n, m in models.items() if n in keep}


def table_rows(models: dict, measured: dict, cname: str, max_tokens: int, mcfg: dict, V: int,
               pad: int, peak: float | None) -> list[str]:  # fmt: skip
    """The table's rows for the models of one (config, batch size) group measured so far, in
    the order they were listed, with MFU and ours/Marian in the same mode where both are in."""
    results = {}
    for mname, (_, opt) in models.items():
        if mname not in measured:  # out of memory, or not measured yet
            continue
        r = dict(measured[mname])
        r["mfu"] = r["mfu_padded"] = None
        if peak and mname != "rnn" and "kind" not in opt:  # FLOPs as in train_flops
            batches = r["batches"]
            real = sum(real_flops(mcfg, b, pad, V) for b in batches)
            padded = sum(train_flops(mcfg, *b.src.shape, b.tgt_in.shape[1], V) for b in batches)
            r["mfu"], r["mfu_padded"] = (x / r["seconds"] / peak for x in (real, padded))
        r["ratio_to"] = peer(mname, opt)
        results[mname] = r
    rows = []
    for mname, r in results.items():
        base = results.get(r["ratio_to"])
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else ""
        rounds = (r.get("round_s", []), base.get("round_s", [])) if base else ([], [])
        if len(rounds[0]) == len(rounds[1]) > 1:  # each round timed the same batches for both
            per_round = [theirs / ours for ours, theirs in zip(*rounds)]
            ratio += f" ({min(per_round):.2f}-{max(per_round):.2f})"
        mfu, mfu_padded = (f"{100 * r[k]:.1f}%" if r[k] else "-" for k in ("mfu", "mfu_padded"))
        first = f"{r['first_s']:.1f}" if "first_s" in r else "-"
        graphs = "{} (+{})".format(*r["compiled"]) if r.get("compiled") else "-"
        peak_gib = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        rows.append(
            f"| {cname} | {max_tokens} | {mname} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{peak_gib} | {r['faults']:,.0f} | {first} | {graphs} | {mfu} | "
            f"{mfu_padded} | {ratio} |"
        )
    return rows


if __name__ == "__main__":
    main()
