"""Training loop: label-smoothed cross-entropy, Adam with inverse-square-root warmup,
gradient clipping and accumulation, validation loss and BLEU, best/last checkpoints,
early stopping, exact resume, and final test translations with sacreBLEU scores.

``train(cfg)`` is a plain function (train.py only calls it), so tests drive it directly.
Under ``torchrun`` it trains data-parallel (``distributed.py``): each rank its own shard of
the token batches, gradients averaged by DistributedDataParallel, validation and stopping
decided alike on every rank, files written by rank 0 only.
Label smoothing: Szegedy et al. 2016; schedule: Vaswani et al. 2017, eq. 3.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint, distributed, resuming
from .attention import (
    SDPA_KINDS,
    AttentionConfig,
    ignored_options,
    use_sdpa_backends,
)
from .compiling import compile_dynamic
from .data import TokenBatcher
from .final_choice import FinalChoice, final_settings
from .host_memory import reuse_freed_memory
from .loss import projected_loss, sequence_loss
from .metrics import bleu, score_all
from .packing import (
    AUTO_CUDA_WIDTH,
    MIN_PAIRS_PER_ROW,
    mean_pair_len,
    pack_batch,
    resolve_width,
    row_layout,
)
from .precision import Bf16Weights, PrecisionError, split_state
from .prefetch import batch_stream
from .run_data import prepare_data
from .run_lock import run_lock
from .seq2seq import OnHost
from .settings import (
    CUDA_GRAPH_MODES,
    TrainingError,
    check_choices,
    check_data_settings,
    check_distributed,
    check_final,
    check_optimizer,
    check_schedule,
    check_sections,
    check_seed,
    implementation,
    pick_device,
    resolve_precision,
)
from .train_log import LogWindow, SkipCounter, open_logs
from .translator import build_model, decode_options, translate_lines, trial_build

log = logging.getLogger(__name__)


def inverse_sqrt(warmup: int):
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then sqrt(warmup / step)."""

    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


# -- the trainer ------------------------------------------------------------------------------
def check_settings(cfg) -> None:
    """Every setting a check can judge on its own, each bad value named by its key
    (``settings.py``), before any work; also the decoding settings of the BLEU evaluations
    and of the final translations, checked now, not when they first decode."""
    check_sections(cfg)
    t = cfg.trainer
    check_schedule(t)
    check_final(t)
    check_data_settings(cfg)
    decode_options(cfg.decode)  # first: final_settings compares its beam size
    for setting in final_settings(cfg.decode, t.final)[1:]:  # [0] is cfg.decode
        try:
            decode_options(setting)
        except ValueError as e:  # it names decode.*, which are fine: name what tries this
            raise TrainingError(
                f"trainer.final: the final choice's beam size {setting.beam_size} with length "
                f"penalty {setting.length_penalty}: {e}"
            ) from None
    check_choices(t)
    check_optimizer(t)
    check_seed(cfg.seed)


class Trainer:
    """One run's training: ``__init__`` checks the settings and builds everything in order
    (device, the checkpoint to resume from, data, model, optimizer, batches, loss), ``run``
    trains until a limit, a signal or early stopping, ``finish`` makes the final
    translations and ``metrics.json``."""

    def __init__(self, cfg, run_dir: Path, dist: distributed.Dist | None = None):
        check_settings(cfg)
        self.cfg, self.t = cfg, cfg.trainer
        # before the data is read: a fresh run trains its tokenizer and encodes the corpus
        # first (13 s of Multi30k here)
        trial = trial_build(cfg.model)
        takes_rows = getattr(trial, "takes_rows", False)  # "auto" resolved with the device
        if self.t.packed_rows not in ("auto", 0) and not takes_rows:
            raise TrainingError(
                f"trainer.packed_rows={self.t.packed_rows} needs the Transformer with "
                f"scaled-dot-product attention (model.attention kinds {' or '.join(SDPA_KINDS)}); "
                "set trainer.packed_rows=0"
            )
        self.compile_mode = self.t.get("compile_mode", "default")
        self.dist = dist or distributed.Dist()
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        if not self.t.resume and checkpoint.resume_candidates(self.ckpt_dir):
            # a new run's step files, best.pt, logs and final average would mix with the old
            raise TrainingError(
                f"trainer.resume=false but {self.ckpt_dir} holds another run's checkpoints; "
                "use another run_dir, or delete them to start over there"
            )
        if self.dist.is_main and self.ckpt_dir.is_dir():  # (under the run's lock: train())
            for stale in checkpoint.remove_temporaries(self.ckpt_dir):
                log.warning("%s: left by a write that was killed: deleted", stale)
        self.set_up_device()
        self.resume_from = self.checkpoint_to_resume()
        # A setting no attention role reads (model.attention.window without local
        # attention, ...) trained as if it were not there; a run that already trained so
        # resumes as it was
        ignored = ignored_options(getattr(trial, "attention_options", None) or AttentionConfig())
        if ignored and self.resume_from is None:
            raise TrainingError("; ".join(ignored))
        self.read_data()
        self.choose_layout(takes_rows)
        self.build_model()
        self.build_optimizer()
        self.build_batchers()
        self.choose_loss()
        # Training position; restored by resume.
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_bleu, self.best_step, self.bad_evals = -1.0, 0, 0
        self.train_seconds, self.train_tokens = 0.0, 0
        self.applied_lr = None  # the lr of the last update (train_log.csv)
        self.window = LogWindow()  # the updates since the last train_log.csv row
        self.stop_signal = None  # set by the signal handler of this process
        self.agreed_signal = None  # the one every rank acts on (agree_to_stop)
        self.epoch_len = 0
        self.saved_step, self.nonfinite_in_a_row = -1, 0
        self.debug = distributed.DebugLog(self.dist.rank)

    # -- building the run, in __init__'s order --------------------------------------------
    def set_up_device(self) -> None:
        """The device and what depends on it: the precision (a bad value fails before the
        data is read), the seed, the CPU's allocator and the attention kernels allowed on
        CUDA."""
        cfg = self.cfg
        self.device = pick_device(cfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.precision = resolve_precision(self.t.precision, self.device)
        torch.manual_seed(cfg.seed)
        reuse = self.t.get("cpu_malloc_reuse", True)
        if reuse and self.device.type == "cpu" and reuse_freed_memory():
            log.info("glibc malloc keeps freed memory for reuse (trainer.cpu_malloc_reuse)")
        sdpa = use_sdpa_backends(self.t.get("sdpa_backends", "auto"), self.device)
        if self.device.type == "cuda":
            log.info("attention kernels allowed: %s", ", ".join(sdpa))

    def checkpoint_to_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint a resumed run continues from, loaded now: a changed model or
        tokenizer setting is refused before the corpus is encoded (``resume`` loads the
        rest). None for a fresh run."""
        if not self.t.resume:
            return None
        found = checkpoint.load_latest(checkpoint.resume_candidates(self.ckpt_dir))
        if found:
            path, ckpt = found
            checkpoint.require(ckpt, path, resuming.TRAINING_KEYS)
            resuming.check_config(self.cfg, path, ckpt["config"], ckpt["progress"])
        return found

    def read_data(self) -> None:
        """The tokenizers and encoded splits (``run_data.py``); rank 0 trains (or finds)
        the tokenizer, the others wait and reuse it."""
        if not self.dist.is_main:
            self.dist.barrier()
        self.splits, self.src_tok, self.tgt_tok, self.tok_info = prepare_data(
            self.cfg, self.run_dir, resuming=self.resume_from is not None
        )
        if self.dist.is_main:
            self.dist.barrier()
        self.pad_id = self.tgt_tok.pad_id
        self.model_kwargs = dict(
            src_vocab_size=len(self.src_tok), tgt_vocab_size=len(self.tgt_tok), pad_id=self.pad_id
        )

    def choose_layout(self, takes_rows: bool) -> None:
        """The width of packed rows (``trainer.packed_rows``; ``takes_rows``: whether the
        model takes them): ``auto`` weighs the device and the training pairs' mean length
        (packing.resolve_width), the same on every rank since each reads the same split."""
        train = self.splits[self.cfg.data.train_split]
        pair_len = mean_pair_len(train.src_lens, train.tgt_lens)
        self.packed_rows = resolve_width(self.t.packed_rows, takes_rows, self.device, pair_len)
        if self.packed_rows:
            log.info("training batches packed %d slots to a row (trainer.packed_rows=%s)",
                     self.packed_rows, self.t.packed_rows)  # fmt: skip
        elif self.t.packed_rows == "auto" and takes_rows and self.device.type == "cuda":
            log.info("training batches padded: the training pairs average %.1f slots, fewer "
                     "than %d to a row of %d (trainer.packed_rows=auto; set a width to pack)",
                     pair_len, MIN_PAIRS_PER_ROW, AUTO_CUDA_WIDTH)  # fmt: skip

    def build_model(self) -> None:
        """``self.model`` is the plain module (optimizer, checkpoints, validation,
        decoding); ``compute_model`` the one the training passes run, a bf16 copy with
        bf16-weights (the optimizer updates self.model, checkpoints hold it: precision.py),
        else the same; ``train_model`` the DDP / torch.compile wrapper around it."""
        self.model = build_model(self.cfg.model, **self.model_kwargs).to(self.device)
        self.mixed = None
        if self.precision == "bf16-weights":
            try:
                self.mixed = Bf16Weights(self.model)
            except PrecisionError as e:
                raise TrainingError(str(e)) from e
            if self.dist.enabled:  # as DDP does for its module: rank 0's weights everywhere
                torch.distributed.broadcast(self.mixed.flat32, 0)
            self.mixed.publish()
        self.compute_model = self.mixed.compute if self.mixed else self.model
        # The RNN packs its source with lengths on the host: counted there before each
        # batch is copied, a step does not wait for the device to copy them back (in an
        # OnHost, which DDP does not copy to the device with the other inputs)
        self.host_lengths = getattr(self.model, "takes_src_lengths", False)
        # Listed once: walking the module tree for them at every update costs host time
        self.params = list(self.model.parameters())
        self.train_model = self.wrap(self.compute_model)
        log.info(
            "model: %s, %.2fM parameters; precision %s",
            self.cfg.model._target_,
            self.model.num_parameters() / 1e6,
            self.precision,
        )

    def build_optimizer(self) -> None:
        """The optimizer, fused (one kernel for all parameters) where its class offers it,
        on the CPU too: it also takes a found_inf flag, so that a NaN/inf update is skipped
        on the device; the warmup schedule; fp16's grad scaler."""
        make_optimizer = instantiate(self.t.optimizer)
        # bf16-weights with Adam/AdamW: one flat parameter, the fp32 buffer (precision.py)
        params = self.mixed.params_for(make_optimizer.func) if self.mixed else self.params
        self.optimizer = make_optimizer(params, **implementation(make_optimizer))
        # LambdaLR's argument is the count of updates done, so the next one is number done + 1
        # (update 1 takes 1 / warmup of the peak, update ``warmup`` the peak)
        factor = inverse_sqrt(self.t.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda done: factor(done + 1)
        )
        # Without a host sync per update when the optimizer can skip by itself (fp16's
        # GradScaler keeps its own found_inf, so it takes the host path).
        self.skip_on_device = (
            bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
            and self.precision != "fp16"
        )
        self.skips = SkipCounter(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def build_batchers(self) -> None:
        """Token batches of the training split (this rank's shard) and of validation."""
        data = self.cfg.data
        specials = (self.pad_id, self.tgt_tok.bos_id, self.tgt_tok.eos_id)
        self.batcher = TokenBatcher(
            self.splits[data.train_split],
            data.max_tokens,
            self.cfg.seed,
            specials,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if not self.batcher.epoch_batches(0):
            raise TrainingError(
                f"the training set makes fewer batches than the {self.dist.world_size} "
                f"processes; lower data.max_tokens={data.max_tokens} or use fewer processes"
            )
        if self.cuda_graphs:
            log.info(
                "CUDA graphs (trainer.compile_mode=%s): one recorded per batch shape; epoch "
                "0 has %d distinct shapes in %d batches",
                self.compile_mode,
                *self.batch_shapes(),
            )
        self.valid_batcher = TokenBatcher(
            self.splits[data.valid_split], data.max_tokens, self.cfg.seed, specials, shuffle=False
        )

    def choose_loss(self) -> None:
        """The output projection fused into the loss or not (``auto``: fused where it was
        measured faster, the CPU; results/bench/train_speed_cpu.md). Compiled, the loss over
        the logits fuses its log-softmax and smoothing into a few kernels (a separate graph:
        under torchrun it stays outside the DDP module); the fused loss always runs eagerly
        (loss.py)."""
        self.fused_loss = self.t.fused_loss is True or (
            self.t.fused_loss == "auto" and self.device.type == "cpu"
        )
        self.sequence_loss = sequence_loss
        if self.t.compile and not self.fused_loss:
            self.sequence_loss = compile_dynamic(sequence_loss, self.compile_mode)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun, then torch.compile when
        ``trainer.compile`` (compiling the DDP module lets its graph break at gradient
        buckets so all-reduce overlaps the backward pass). ``compile_dynamic``: token batches
        change shape at every step and must not recompile each time. ``trainer.compile_mode``
        is torch.compile's ``mode``; ``reduce-overhead`` replays the forward and backward as
        CUDA graphs, one recorded per batch shape (see ``batch_shapes``)."""
        if self.dist.enabled:
            model = distributed.wrap_ddp(model, self.device)
        if self.t.compile:
            model = compile_dynamic(model, self.compile_mode)
        return model

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled training step replays CUDA graphs (reduce-overhead or
        max-autotune, on CUDA)."""
        cuda = self.device.type == "cuda"
        return bool(self.t.compile) and self.compile_mode in CUDA_GRAPH_MODES and cuda

    def batch_shapes(self) -> tuple[int, int]:
        """(distinct (B, S, T) shapes, batches) in this rank's plan of epoch 0, from the
        lengths alone: with CUDA graphs each new shape is recorded once (a recording run, and
        memory in the graphs' pool), and later epochs repeat the shapes since batches are cut
        from sorted lengths. With packed rows, the (rows, S, T) of the packed batches."""
        plan = self.batcher.epoch_batches(0)
        shape = self.packed_shape if self.packed_rows else self.batcher.batch_shape
        return len({shape(idx) for idx in plan}), len(plan)

    def packed_shape(self, idx) -> tuple[int, int, int]:
        """The (rows, S, T) of ``batch(idx)`` in packed rows, from the lengths alone (EOS on
        the source, BOS or EOS on the target: one more token each)."""
        split = self.batcher.split
        lay = row_layout(split.src_lens[idx] + 1, split.tgt_lens[idx] + 1, self.packed_rows)
        return lay.rows, lay.src_width, lay.tgt_width

    def reseed_rank(self) -> None:
        """Ranks other than 0 draw their own dropout masks, seeded from (seed, rank, step)
        before every update, so that a rank's masks depend on the step alone and a resumed
        run draws those of a run never stopped (seeded only when the trainer was built, a
        rank's stream depended on where the run had last started, and a resume under torchrun
        with dropout trained other weights); rank 0 keeps the stream of a single-process run
        (and of its checkpoint)."""
        if self.dist.rank > 0:
            seq = np.random.SeedSequence([self.cfg.seed, self.dist.rank, self.step])
            torch.manual_seed(int(seq.generate_state(1)[0]))

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": checkpoint.unwrap(self.model).state_dict(),
            "model_kwargs": self.model_kwargs,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "tokenizer": self.tok_info,
            "optimizer": self.optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "best_bleu": self.best_bleu,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
                "train_seconds": self.train_seconds,
                "train_tokens": self.train_tokens,
            },
            "rng": resuming.rng_state(),
            "world_size": self.dist.world_size,  # what batch_in_epoch counts in (per rank)
        }

    def flat_update(self) -> bool:
        """Whether the optimizer updates the bf16-weights flat fp32 buffer as one parameter."""
        return bool(self.mixed) and self.mixed.flat_update

    def optimizer_state(self) -> dict:
        """The optimizer's state over the model's parameters, whichever tensors it updates:
        checkpoints are the same for every precision."""
        state = self.optimizer.state_dict()
        return split_state(state, self.params) if self.flat_update() else state

    def save_checkpoint(self, best: bool = False, step_file: bool = True) -> None:
        """Write last.pt and keep it as step_N.pt too (a hard link), pruning step files to
        the newest ``trainer.keep_checkpoints``; ``best``: link it as best.pt as well.
        ``step_file=False`` (a stop between evaluations): last.pt only, so that the step
        files, which the final average takes, are those of the evaluations, as in a run
        never stopped. Only rank 0 writes (the weights are the same on every rank)."""
        self.saved_step = self.step
        window = self.saved_window()  # collective: before the other ranks return
        if not self.dist.is_main:
            return
        last = self.ckpt_dir / "last.pt"
        # step_file: a kill before the link below leaves last.pt without its step file,
        # which the resume makes then (resuming.match_files)
        checkpoint.save(last, {**self.state(), "log_window": window, "step_file": step_file})
        if step_file:
            if self.t.keep_checkpoints > 0:
                checkpoint.link_or_copy(last, self.ckpt_dir / f"step_{self.step:08d}.pt")
            # with 0 too: a run resumed with keep_checkpoints=0 kept its earlier step files,
            # and its final average took them, however old
            checkpoint.prune(self.ckpt_dir, self.t.keep_checkpoints)
        if best:
            checkpoint.link_or_copy(last, self.ckpt_dir / "best.pt")

    def saved_window(self) -> dict:
        """The train_log.csv window so far, as a checkpoint keeps it: loss and tokens of all
        ranks (rank 0 takes them up on resume, the others start from none), the skipped
        updates' tokens taken out first (and out of ``train_tokens``, which is saved too)."""
        w = self.window
        w.tokens -= self.check_skips()
        loss, tokens = self.dist.sum([float(w.loss), w.tokens])
        return {"loss": loss, "tokens": int(tokens), "pad": w.pad, "batches": w.batches,
                "seconds": w.elapsed()}  # fmt: skip

    def resume(self) -> bool:
        """Continue from the newest loadable checkpoint (last.pt, else the step files, newest
        first; damaged ones skipped with a warning), found by __init__ (``resuming.py``).
        False when there is none."""
        if self.resume_from is None:
            return False
        (path, ckpt), self.resume_from = self.resume_from, None  # its memory goes with resume
        if ckpt["tokenizer"] != self.tok_info:
            raise TrainingError(f"{path} was trained with another tokenizer than this run's")
        model = checkpoint.unwrap(self.model)
        flat = self.params if self.flat_update() else None
        optim = resuming.optimizer_state(path, ckpt, model, self.optimizer, flat)
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(optim)
        resuming.restore_schedule(
            self.optimizer, self.scheduler, self.optimizer.defaults["lr"], ckpt["scheduler"]
        )
        if ckpt["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        else:  # saved by a run of another precision, whose scaler was off (its state empty)
            log.info("%s: no loss scale saved (another precision): fp16 starts a fresh one", path)
        for key, value in ckpt["progress"].items():
            setattr(self, key, value)
        # (a checkpoint from before 2026-12-04 does not say: taken as this run's)
        before = ckpt.get("world_size", self.dist.world_size)
        self.batch_in_epoch = resuming.position_for(
            self.batch_in_epoch, before, self.dist.world_size, self.epoch
        )
        if "log_window" in ckpt and self.dist.is_main:  # (not in checkpoints before 2026-12)
            self.window = LogWindow(**ckpt["log_window"])
        resuming.restore_rng(ckpt["rng"])  # rank 0's; the others reseed at every update
        self.saved_step = self.step
        if self.dist.is_main:
            resuming.match_files(self.ckpt_dir, path, self.step, self.best_step)
            if ckpt.get("step_file") and path.name == "last.pt":
                resuming.make_step_file(self.ckpt_dir, path, self.step, self.t.keep_checkpoints)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )
        return True

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def valid_loss(self) -> tuple[float, float]:
        """Teacher-forced per-token label-smoothed loss and NLL on the validation set (each
        rank its share of the batches, sums all-reduced)."""
        self.model.eval()
        total, nll_total, ntok = 0.0, 0.0, 0
        for idx in self.dist.shard(self.valid_batcher.epoch_batches(0)):
            batch = self.to_device(self.valid_batcher.batch(idx))
            with self.autocast():
                logits = self.model(batch.src, batch.src_mask, batch.tgt_in)
            loss = sequence_loss(logits, batch.tgt_out, self.pad_id, self.t.label_smoothing)
            nll = sequence_loss(logits, batch.tgt_out, self.pad_id, 0.0)
            total, nll_total = total + loss.item(), nll_total + nll.item()
            ntok += int((batch.tgt_out != self.pad_id).sum())
        self.model.train()
        total, nll_total, ntok = self.dist.sum([total, nll_total, ntok])
        return total / ntok, nll_total / ntok

    def translate(self, split_name: str, decode_cfg) -> list[str]:
        """Translations of a split, in order; each rank decodes every world_size-th line
        with the plain (uncompiled) model and every rank gets all of them back."""
        self.model.eval()
        lines = self.dist.shard(self.splits[split_name].src_text)
        hyps = []
        if lines:
            with self.autocast():
                hyps = translate_lines(
                    self.model,
                    lines,
                    self.src_tok,
                    self.tgt_tok,
                    decode_cfg,
                    self.device,
                    self.cfg.data.max_len,
                )
        self.model.train()
        return self.dist.unshard(self.dist.gather(hyps))

    def valid_bleu(self) -> float:
        """Greedy BLEU on the validation split; its hypotheses are kept as
        RUN/valid_greedy/step_N.hyp (and the sacreBLEU signature beside them)."""
        greedy = OmegaConf.create(
            {
                "beam_size": 1,
                "max_tokens": self.cfg.decode.max_tokens,
                "max_len_a": self.cfg.decode.max_len_a,
                "max_len_b": self.cfg.decode.max_len_b,
            }
        )
        hyps = self.translate(self.cfg.data.valid_split, greedy)
        score, signature = bleu(hyps, self.splits[self.cfg.data.valid_split].tgt_text)
        if self.dist.is_main:  # the hypotheses behind valid_log.csv's figure, and how scored
            folder = self.run_dir / "valid_greedy"
            folder.mkdir(exist_ok=True)
            (folder / f"step_{self.step:08d}.hyp").write_text("".join(h + "\n" for h in hyps))
            (folder / "signature.txt").write_text(signature + "\n")
        return score

    def autocast(self, training: bool = False):
        """Autocast of this precision: for validation and decoding (the fp32 model) bf16-weights
        runs as bf16 on CUDA, as fp32 on the CPU; its training passes (the bf16 copy) run
        without autocast."""
        precision = self.precision
        if precision == "bf16-weights":
            precision = "fp32" if training or self.device.type != "cuda" else "bf16"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # -- training -------------------------------------------------------------------------
    def batches(self):
        """Endless (position, Batch, PackedBatch or None) stream of this rank's batches from
        the saved position, packed in rows with ``trainer.packed_rows``: made here, or by
        ``trainer.data_workers`` processes (``prefetch.py``). The epoch moves on as its first
        batch is taken."""
        stream = batch_stream(self.batcher, self.epoch, self.batch_in_epoch, self.pad_id,
                              self.packed_rows, self.t.data_workers)  # fmt: skip
        planned = None  # the epoch whose length epoch_len holds
        try:
            for item in stream:
                if item.epoch != self.epoch:
                    self.epoch, self.batch_in_epoch = item.epoch, 0
                if planned != self.epoch:
                    planned = self.epoch
                    self.epoch_len = len(self.batcher.epoch_batches(planned))
                self.debug.write(step=self.step + 1, epoch=self.epoch,
                                 examples=item.examples.tolist())  # fmt: skip
                yield item.pos, item.batch, item.packed
        finally:  # generator closed: a loader's iterator, dropped, ends its workers
            del stream

    def to_device(self, batch):
        """Host-to-device copy; on CUDA from pinned memory, so that it runs asynchronously."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def train_step(self, micro_batches, packed=None) -> tuple[torch.Tensor, int] | None:
        """One optimizer update over ``accum_steps`` micro-batches (``packed``: each one's
        packed rows where the batch stream packed them, else None), normalised by the target
        tokens of the update on all ranks. Returns (summed loss, target tokens) of this rank.
        An update whose gradient norm is NaN/inf is skipped (the norm is of the all-reduced
        gradient, so every rank skips alike; the weights and moments stay unchanged): by the
        fused optimizer itself, without a host sync, its loss returned as 0 and the skip
        counted on the device (``check_skips``); or, with an optimizer that cannot (or fp16),
        on the host, and then None is returned."""
        ntok = sum(int((b.tgt_out != self.pad_id).sum()) for b in micro_batches)
        (ntok_all,) = self.dist.sum([ntok])
        # DDP averages gradients over ranks, so dividing each rank's summed loss by
        # ntok_all / world_size gives the gradient of (all losses) / ntok_all.
        total = self.accumulate(micro_batches, ntok_all / self.dist.world_size, packed)
        self.scaler.unscale_(self.optimizer)
        if self.mixed:  # on the flat gradient buffer (precision.py)
            norm = self.mixed.clip_grad_norm_(self.t.clip_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.t.clip_norm)
        if self.skip_on_device:  # no host sync: the fused step is skipped where found_inf = 1
            bad = ~torch.isfinite(norm)
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
            del self.optimizer.found_inf
            self.skips.record(bad, ntok)
            total = torch.where(bad, 0.0, total)
            finite = True  # counted as an update; check_skips reads the skips later
        else:
            finite = bool(torch.isfinite(norm))  # a host sync per update, to skip on the host
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # with fp16, a skipped update also lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.mixed:
            self.mixed.publish()
        if not finite:
            return None
        self.applied_lr = self.optimizer.param_groups[0]["lr"]  # train_log.csv's, a float
        self.scheduler.step()
        self.train_tokens += int(ntok_all)
        return total, ntok

    def accumulate(self, micro_batches, ntok: float, packed=None) -> torch.Tensor:
        """Forward and backward over the micro-batches (each in the packed rows of
        ``packed`` where given), each summed loss divided by ``ntok``; under DDP gradients
        are all-reduced in the last backward only. On
        out-of-memory the whole update is retried with every micro-batch split in halves
        (``trainer.oom_retries`` times, single process only: DDP expects the same backward
        passes on every rank; the gradient is the same since losses are summed), then fails
        with one line naming the batch shape."""
        retries = 0 if self.dist.enabled else self.t.oom_retries
        for attempt in range(retries + 1):
            try:
                total = torch.zeros((), device=self.device)
                for i, b in enumerate(micro_batches):
                    if packed and packed[i] is not None:  # packed by the batch stream
                        b = packed[i]
                    elif self.packed_rows:  # given unpacked: the halves of an out-of-memory batch
                        b = pack_batch(b, self.pad_id, self.packed_rows)
                    lengths = OnHost(b.src_mask.sum(dim=1)) if self.host_lengths else None
                    b = self.to_device(b)
                    if self.cuda_graphs:  # outputs of the last replay are consumed: reuse them
                        torch.compiler.cudagraph_mark_step_begin()
                    with self.grad_sync(i == len(micro_batches) - 1):
                        loss = self.loss(b, lengths)
                        self.scaler.scale(loss / ntok).backward()
                    if self.cuda_graphs and i == 0 and len(micro_batches) > 1:
                        self.copy_grads_out_of_graphs()
                    total += loss.detach()
                if self.mixed:
                    self.mixed.gather_grads()
                return total
            except torch.OutOfMemoryError:
                pass  # handled below, once the traceback (and the tensors it holds) is gone
            loss = None
            self.optimizer.zero_grad(set_to_none=True)
            self.compute_model.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            shapes = " + ".join(
                f"src {tuple(b.src.shape)} tgt {tuple(b.tgt_out.shape)}" for b in micro_batches
            )
            if attempt == retries or all(len(b.src) == 1 for b in micro_batches):
                raise TrainingError(
                    f"out of memory at step {self.step + 1} on a batch of {shapes} "
                    f"({ntok} target tokens); lower data.max_tokens"
                )
            log.warning(
                "out of memory at step %d on a batch of %s; retrying it split in halves",
                self.step + 1,
                shapes,
            )
            micro_batches = [half for b in micro_batches for half in b.halves()]
            packed = None  # the halves are packed here
        raise AssertionError("unreachable")

    def copy_grads_out_of_graphs(self) -> None:
        """Under CUDA graphs the first backward of an update hands the graph's own output
        buffers to ``.grad`` (autograd keeps a fresh gradient without a copy), and the next
        micro-batch's replay writes into that memory: copy them out once, after the first
        micro-batch; later backwards add into the copies. (Without: torch 2.13 stops with
        "accessing gradient tensor output of CUDAGraphs that has been overwritten"; older
        versions could sum wrong values, pytorch/pytorch#96693.) An update of one
        micro-batch needs no copy: the optimizer has used its gradients, and they are
        dropped, before the next replay."""
        with torch.no_grad():
            for p in self.compute_model.parameters():
                if p.grad is not None:
                    p.grad = p.grad.clone()

    def loss(self, b, src_lengths: OnHost | None = None) -> torch.Tensor:
        """Summed label-smoothed loss of batch ``b`` through the training model, with the
        output projection fused into the loss (``transformer/loss.py``) or not
        (``src_lengths``: the real source tokens of each row, counted on the host, for a
        model that packs its source with them: the RNN)."""
        ls = self.t.label_smoothing
        extra = {"rows": b.rows} if self.packed_rows else {}  # packing.PackedBatch
        if src_lengths is not None:
            extra["src_lengths"] = src_lengths
        with self.autocast(training=True):
            if not self.fused_loss:
                return self.sequence_loss(
                    self.train_model(b.src, b.src_mask, b.tgt_in, **extra),
                    b.tgt_out, self.pad_id, ls,
                )  # fmt: skip
            features = self.train_model(b.src, b.src_mask, b.tgt_in, project=False, **extra)
            out_proj = self.compute_model.out_proj
            return projected_loss(features, out_proj, b.tgt_out, self.pad_id, ls)

    def grad_sync(self, last: bool):
        """A context in which DDP skips its gradient all-reduce (all micro-batches of an
        update but the last); a no-op context otherwise."""
        ddp = self.train_model
        ddp = getattr(ddp, "_orig_mod", ddp)  # under torch.compile
        if last or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def check_skips(self) -> int:
        """Read the device's count of skipped NaN/inf updates (one host sync; at each log
        interval); warn about them, and abort if ``trainer.max_nonfinite`` came in a row.
        Returns this rank's target tokens of the skipped updates, for the loss per token;
        those of all ranks leave the count of tokens trained on (``train_tokens``).
        Every rank skips the same updates (the norm is of the all-reduced gradient)."""
        count, longest, tokens = self.skips.read()
        if count:
            (skipped_all,) = self.dist.sum([tokens])
            self.train_tokens -= int(skipped_all)
            log.warning(
                "%d of the updates up to step %d skipped: NaN/inf loss or gradient "
                "(longest run %d)",
                count,
                self.step,
                longest,
            )
        self.abort_if_nonfinite(longest, f"up to step {self.step}")
        return tokens

    def abort_if_nonfinite(self, in_a_row: int, where: str) -> None:
        if in_a_row >= self.t.max_nonfinite:
            raise TrainingError(
                f"{in_a_row} updates in a row had a NaN/inf loss or gradient ({where}); lower "
                f"trainer.optimizer.lr or check the data "
                f"(trainer.max_nonfinite={self.t.max_nonfinite})"
            )

    def skipped_update(self) -> None:
        """Count a NaN/inf update skipped on the host (optimizers that cannot skip by
        themselves, fp16); abort after ``trainer.max_nonfinite`` in a row."""
        self.nonfinite_in_a_row += 1
        log.warning(
            "step %d: loss or gradient is NaN/inf; update skipped (%d in a row)",
            self.step + 1,
            self.nonfinite_in_a_row,
        )
        self.abort_if_nonfinite(self.nonfinite_in_a_row, f"at step {self.step + 1}")

    def on_signal(self, signum, _frame):
        self.stop_signal = signum

    def run(self) -> dict:
        t = self.t
        resumed = t.resume and self.resume()
        train_log, valid_log = open_logs(self.run_dir, self.dist.is_main, self.step)
        old_handlers = {
            s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (t.progress_bar and self.dist.is_main),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        max_seconds = t.max_time_minutes * 60 if t.max_time_minutes else float("inf")
        stream, stop_reason = self.batches(), self.already_finished(max_seconds)
        if stop_reason is None:  # training happens: the results of before are not its
            self.set_aside_results(resumed)
        if self.mixed:  # the fp32 weights may have been loaded from a checkpoint
            self.mixed.publish()
        self.model.train()
        self.compute_model.train()
        self.window.start()
        try:
            while stop_reason is None:
                step_start = time.perf_counter()  # making the batches is training time too
                micro, packed, w = [], [], self.window
                for _ in range(t.accum_steps):
                    pos, batch, rows = next(stream)
                    micro.append(batch)
                    packed.append(rows)
                    w.pad += self.batcher.padding_fraction(batch)
                    if self.epoch + 1 >= t.max_epochs and pos + 1 >= self.epoch_len:
                        break  # the last epoch's last batch: no micro-batch of the next
                w.batches += len(micro)
                self.reseed_rank()
                result = self.train_step(micro, packed)
                self.batch_in_epoch = pos + 1
                if result is not None:
                    self.nonfinite_in_a_row = 0
                    self.step += 1
                    w.loss, w.tokens = w.loss + result[0], w.tokens + result[1]
                    if self.step % t.log_every == 0:
                        w.tokens -= self.check_skips()
                        self.log_window(train_log, bar, w)
                        self.window = LogWindow().start()
                    self.train_seconds += time.perf_counter() - step_start
                    bar.update(1)
                out_of_time = self.agree_to_stop(max_seconds)
                if result is None:
                    self.skipped_update()
                    stop_reason = self.signal_reason() or self.end_after_a_skip(
                        valid_log, out_of_time
                    )
                    continue
                self.window.pause()  # tokens/s of training only
                stop_reason = self.maybe_evaluate(valid_log, out_of_time)
                self.window.start()
                stop_reason = self.signal_reason() or stop_reason
        finally:
            stream.close()  # ends its workers, if any
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.step != self.saved_step:  # stopped by a signal, between evaluations
            self.save_checkpoint(step_file=False)
        self.debug.write(step=self.step, weights_sha256=self.weights_sha256())
        log.info("stopped at step %d: %s", self.step, stop_reason)
        (signum,) = self.dist.max([self.stop_signal or 0])  # also one caught after the loop
        if signum:
            raise KeyboardInterrupt(
                f"interrupted at step {self.step}; last.pt saved in "
                f"{self.ckpt_dir}; run the same command to resume"
            )
        return {"stop_reason": stop_reason}

    def set_aside_results(self, resumed: bool) -> None:
        """A finished run trained on (its limits raised), or a fresh one started in a
        finished run's folder (its checkpoints deleted): the metrics.json there, read as the
        run's result by compare, runs_table.py and ``translate.py ckpt=RUN``, would stand
        for other weights until the new one is written at the end, and for good if this run
        is killed first. It is renamed metrics.previous.json (kept, not lost)."""
        old = self.run_dir / "metrics.json"
        if self.dist.is_main and old.is_file():
            old.replace(self.run_dir / "metrics.previous.json")
            now = (
                f"the finished run's results, renamed metrics.previous.json: training goes on "
                f"from step {self.step}"
                if resumed
                else "the results of an earlier run in this folder, renamed "
                "metrics.previous.json: a fresh run starts here"
            )
            log.warning("%s: %s, and a new metrics.json is written at the end", old, now)

    def epochs_trained(self) -> float:
        """Epochs trained, with the part of the current one: 1.5 halfway through the second."""
        return self.epoch + self.batch_in_epoch / len(self.batcher.epoch_batches(self.epoch))

    def already_finished(self, max_seconds: float) -> str | None:
        """Why a run started again from its checkpoint has nothing left to train under this
        run's limits (raised limits train on), or None: it had stopped at a limit, or
        patience had run out, as the run resumed from would stop now."""
        t = self.t
        epoch_len = len(self.batcher.epoch_batches(self.epoch))
        if self.step > t.max_steps:  # lowered since: the steps past it are not undone
            return f"already at step {self.step}, past trainer.max_steps={t.max_steps}"
        if self.step == t.max_steps:
            return f"already at trainer.max_steps={t.max_steps}"
        if self.epoch + (self.batch_in_epoch >= epoch_len) >= t.max_epochs:
            return f"already trained trainer.max_epochs={t.max_epochs}"
        if self.train_seconds >= max_seconds:
            return f"already trained trainer.max_time_minutes={t.max_time_minutes}"
        if t.patience and self.bad_evals >= t.patience:
            return f"already no valid BLEU gain in {t.patience} evaluations"
        return None

    def log_window(self, train_log, bar, w: LogWindow) -> None:
        """One train_log.csv row for the last ``log_every`` updates: loss per target token
        and tokens/s of all ranks together (training time only), and the mean padding
        fraction of this rank's batches."""
        loss_sum, ntok = self.dist.sum([float(w.loss), w.tokens])  # float(): a host sync
        if ntok <= 0:  # every update of the window was skipped (NaN/inf): no loss to show
            return
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": round(loss_sum / ntok, 4),
            "lr": self.applied_lr,  # of the window's last update
            "tokens_per_s": round(ntok / w.elapsed()),
            "pad_frac": round(w.pad / w.batches, 3),
        }
        train_log.write(row)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}",
            lr=f"{row['lr']:.2e}",
            tok_s=row["tokens_per_s"],
            ep=self.epoch,
        )

    def agree_to_stop(self, max_seconds: float) -> bool:
        """Stop flags every rank acts on alike, once per update: a signal caught by any rank
        stops all of them (``agreed_signal``), and so does any rank's training clock passing
        ``trainer.max_time_minutes``. Returns whether time is up."""
        signum, late = self.dist.max(
            [self.stop_signal or 0, int(self.train_seconds >= max_seconds)]
        )
        self.agreed_signal = signum or None
        return bool(late)

    def signal_reason(self) -> str | None:
        if self.agreed_signal is None:
            return None
        return f"signal {signal.Signals(self.agreed_signal).name}"

    def weights_sha256(self) -> str | None:
        """Hash of the weights for the debug log (None when it is off: hashing costs time)."""
        if self.debug.path is None:
            return None
        return distributed.state_dict_sha256(self.model.state_dict())

    def epochs_done(self) -> int:
        """Whole epochs trained: the current one counts once its last batch is taken."""
        return self.epoch + (self.batch_in_epoch >= self.epoch_len)

    def end_after_a_skip(self, valid_log, out_of_time: bool) -> str | None:
        """After an update skipped on the host: why training ends there (the time is up, or
        the last epoch's last batch was that update's: the next ones were another epoch's,
        trained past the limit before the next evaluation stopped it), with the final
        evaluation unless this step had one; None to go on."""
        if not (out_of_time or self.epochs_done() >= self.t.max_epochs):
            return None
        if self.saved_step == self.step:  # evaluated and saved at this step already
            return "time limit" if out_of_time else "step/epoch limit"
        self.window.pause()
        stop = self.maybe_evaluate(valid_log, out_of_time)
        self.window.start()
        return stop

    def maybe_evaluate(self, valid_log, out_of_time: bool) -> str | None:
        """Validation, checkpoints and stopping decisions after a step; returns a reason to
        stop or None, the same on every rank (rank 0's)."""
        t = self.t
        at_end = self.step >= t.max_steps or self.epochs_done() >= t.max_epochs or out_of_time
        bleu_now = self.step % t.bleu_every == 0 or at_end  # BLEU comes with a validation
        if not (self.step % t.eval_every == 0 or bleu_now):
            return None
        loss, nll = self.valid_loss()
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "train_seconds": round(self.train_seconds, 1),
            "valid_loss": round(loss, 4),
            "valid_nll": round(nll, 4),
            "valid_ppl": round(math.exp(min(nll, 50)), 2),
            "valid_bleu": "",
        }
        stop, improved = None, False
        if bleu_now:
            score = self.valid_bleu()
            row["valid_bleu"] = round(score, 2)
            if score > self.best_bleu:
                self.best_bleu, self.best_step, self.bad_evals = score, self.step, 0
                improved = True
            else:
                self.bad_evals += 1
                if t.patience and self.bad_evals >= t.patience:
                    stop = f"no valid BLEU gain in {t.patience} evaluations"
        valid_log.write(row)
        scored = "" if row["valid_bleu"] == "" else f" bleu {row['valid_bleu']:.2f}"
        log.info("step %d: valid loss %.3f ppl %.2f%s", self.step, loss, row["valid_ppl"], scored)
        self.save_checkpoint(best=improved)
        if at_end and stop is None:
            stop = "time limit" if out_of_time else "step/epoch limit"
        # Every rank saw the same hypotheses, so the same BLEU; rank 0's decision is
        # broadcast anyway so that early stopping is decided exactly once.
        return self.dist.broadcast(stop)

    def finish(self) -> dict:
        """Translate the valid and test splits with the weights and decoding settings chosen
        on valid (``FinalChoice``) and score them (every rank decodes its share; rank 0
        writes the files)."""
        self.dist.barrier()  # rank 0 has written best.pt
        final, decode_cfg, valid_hyps = FinalChoice(self).choose()
        metrics = {
            "model": self.cfg.model._target_,
            "parameters": self.model.num_parameters(),
            "steps": self.step,
            "epochs": round(self.epochs_trained(), 3),
            "best_step": self.best_step,
            "best_valid_bleu": round(self.best_bleu, 2),
            "train_seconds": round(self.train_seconds, 1),
            "train_tokens_per_s": round(self.train_tokens / max(self.train_seconds, 1e-9)),
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "torch": torch.__version__,
            "decode": OmegaConf.to_container(decode_cfg),
            "final": final,
        }
        d = self.cfg.data
        for name in [d.valid_split, *d.test_splits]:
            start = time.perf_counter()
            if name == d.valid_split and valid_hyps is not None:
                hyps, seconds = valid_hyps
            else:
                hyps = self.translate(name, decode_cfg)
                seconds = time.perf_counter() - start
            scores = score_all(hyps, self.splits[name].tgt_text)
            scores["decode_sentences_per_s"] = round(len(hyps) / seconds, 1)
            metrics[name] = scores
            if self.dist.is_main:
                text = "".join(h + "\n" for h in hyps)
                (self.run_dir / f"{name}.hyp").write_text(text, "utf-8")
            log.info(
                "%s: BLEU %.2f chrF %.2f (%s)",
                name,
                scores["bleu"],
                scores["chrf"],
                scores["bleu_signature"],
            )
        if self.dist.is_main:  # whole or not at all: what compare and translate.py read
            tmp = self.run_dir / ".metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            tmp.replace(self.run_dir / "metrics.json")
        return metrics


def train(cfg) -> dict:
    """Train per ``cfg`` into ``cfg.run_dir``; returns the final metrics dict. Under
    torchrun, every process calls this; it joins and finally leaves the process group."""
    check_sections(cfg)
    check_distributed(cfg.trainer)
    ctx = distributed.from_env()
    device = pick_device(cfg.device, ctx.local_rank if ctx.enabled else None)
    ctx = distributed.init(ctx, cfg.trainer.dist_backend, device, cfg.trainer.dist_timeout_minutes)
    try:
        if not ctx.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        if ctx.enabled:  # ranks started a second apart may have named different run dirs
            cfg.run_dir = ctx.broadcast(str(cfg.run_dir))
        run_dir = Path(cfg.run_dir)
        if ctx.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrainingError(f"run_dir={run_dir} is not writable: {e.strerror or e}") from e
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise TrainingError(f"run_dir={run_dir} is not writable: permission denied")
        with contextlib.ExitStack() as held:
            busy = None
            if ctx.is_main:  # one lock for the run: rank 0's; every rank stops alike
                try:
                    held.enter_context(run_lock(run_dir))
                except TrainingError as e:
                    busy = str(e)
            if busy := ctx.broadcast(busy):
                raise TrainingError(busy)
            trainer = Trainer(cfg, run_dir, ctx)
            if ctx.is_main:  # not before: a refused resume leaves the run's own config.yaml
                (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            trainer.run()
            return trainer.finish()
    finally:
        distributed.shutdown(ctx)
