"""Training loop: label-smoothed cross-entropy, Adam with inverse-square-root warmup,
gradient clipping and accumulation, validation loss and BLEU, best/last checkpoints,
early stopping, exact resume, and final test translations with sacreBLEU scores.

``train(cfg)`` is a plain function (train.py only calls it), so tests drive it directly.
Label smoothing: Szegedy et al. 2016; schedule: Vaswani et al. 2017, eq. 3.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from . import checkpoint
from .attention import attention_config
from .data import TokenBatcher, encode_split, load_split
from .metrics import bleu, score_all
from .tokenizer import copy_into, file_sha256, train_or_load
from .translator import build_model, translate_lines

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A fault that stops training with a clear message."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={name} requested but CUDA is not available")
    return torch.device(name)


def inverse_sqrt(warmup: int):
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then sqrt(warmup / step)."""

    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


def sequence_loss(logits, tgt_out, pad_id: int, label_smoothing: float):
    """Summed label-smoothed cross-entropy over non-pad target tokens."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    return F.cross_entropy(
        flat_logits,
        tgt_out.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


# -- data and tokenizer -----------------------------------------------------------------------
def prepare_data(cfg, run_dir: Path):
    """Load splits, train or reuse the tokenizer(s), copy them into the run dir, encode."""
    d = cfg.data
    raw = {split: load_split(d, split) for split in [d.train_split, d.valid_split, *d.test_splits]}
    train_raw = raw[d.train_split]
    spm_args = dict(
        cache_dir=Path(d.cache_dir) / "spm",
        vocab_size=d.vocab_size,
        model_type=d.spm_model_type,
        character_coverage=d.character_coverage,
        input_sentence_size=d.spm_input_sentence_size,
        seed=cfg.seed,
    )
    if d.joint_vocab:
        src_tok = tgt_tok = train_or_load(
            list(train_raw["src"]) + list(train_raw["tgt"]), **spm_args
        )
        paths = {"src": copy_into(src_tok, run_dir, "tokenizer/joint.model")}
        paths["tgt"] = paths["src"]
    else:
        src_tok = train_or_load(list(train_raw["src"]), **spm_args)
        tgt_tok = train_or_load(list(train_raw["tgt"]), **spm_args)
        paths = {
            "src": copy_into(src_tok, run_dir, f"tokenizer/{d.src_lang}.model"),
            "tgt": copy_into(tgt_tok, run_dir, f"tokenizer/{d.tgt_lang}.model"),
        }
    tok_info = {}
    for side, p in paths.items():
        tok_info[side] = str(p.relative_to(run_dir))
        tok_info[f"{side}_sha256"] = file_sha256(p)
    splits = {
        name: encode_split(
            ds, src_tok, tgt_tok, d.max_len, name == d.train_split, f"{d.name}/{name}"
        )
        for name, ds in raw.items()
    }
    return splits, src_tok, tgt_tok, tok_info


# -- the loop ---------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.t = cfg, cfg.trainer
        self.run_dir, self.ckpt_dir = run_dir, run_dir / "checkpoints"
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.splits, self.src_tok, self.tgt_tok, self.tok_info = prepare_data(cfg, run_dir)
        self.pad_id = self.tgt_tok.pad_id
        self.model_kwargs = dict(
            src_vocab_size=len(self.src_tok), tgt_vocab_size=len(self.tgt_tok), pad_id=self.pad_id
        )
        self.model = build_model(cfg.model, **self.model_kwargs).to(self.device)
        log.info(
            "model: %s, %.2fM parameters", cfg.model._target_, self.model.num_parameters() / 1e6
        )
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = instantiate(self.t.optimizer, **fused)(self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, inverse_sqrt(self.t.warmup_steps)
        )
        specials = (self.pad_id, self.tgt_tok.bos_id, self.tgt_tok.eos_id)
        self.batcher = TokenBatcher(
            self.splits[cfg.data.train_split], cfg.data.max_tokens, cfg.seed, specials
        )
        self.valid_batcher = TokenBatcher(
            self.splits[cfg.data.valid_split],
            cfg.data.max_tokens,
            cfg.seed,
            specials,
            shuffle=False,
        )
        self.precision = self.t.precision if self.device.type == "cuda" else "fp32"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        # Training position; restored by resume.
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_bleu, self.best_step, self.bad_evals = -1.0, 0, 0
        self.train_seconds, self.train_tokens = 0.0, 0
        self.stop_signal = None
        self.epoch_len = 0
        self.saved_step, self.nonfinite_in_a_row = -1, 0

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": checkpoint.unwrap(self.model).state_dict(),
            "model_kwargs": self.model_kwargs,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "tokenizer": self.tok_info,
            "optimizer": self.optimizer.state_dict(),
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
            "rng": rng,
        }

    def save_checkpoint(self) -> Path:
        """Write last.pt and keep it as step_N.pt too (a hard link), pruning step files to
        the newest ``trainer.keep_checkpoints``."""
        last = self.ckpt_dir / "last.pt"
        checkpoint.save(last, self.state())
        if self.t.keep_checkpoints > 0:
            checkpoint.link_or_copy(last, self.ckpt_dir / f"step_{self.step:08d}.pt")
            checkpoint.prune(self.ckpt_dir, self.t.keep_checkpoints)
        self.saved_step = self.step
        return last

    def resume(self) -> bool:
        """Continue from the newest loadable checkpoint (last.pt, else the step files, newest
        first); damaged ones are skipped with a warning. False when there is none."""
        last = self.ckpt_dir / "last.pt"
        older = [p for p in checkpoint.step_checkpoints(self.ckpt_dir) if p != last]
        found = checkpoint.load_latest([last, *older] if last.is_file() else older)
        if found is None:
            return False
        path, ckpt = found
        if ckpt["tokenizer"] != self.tok_info:
            raise TrainingError(f"{path} was trained with another tokenizer than this run's")
        self.check_config(path, ckpt["config"])
        checkpoint.unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for key, value in ckpt["progress"].items():
            setattr(self, key, value)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.saved_step = self.step
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )
        return True

    def check_config(self, path: Path, saved: dict) -> None:
        """Refuse to resume with another model; warn about any other changed setting."""
        now = flatten(with_full_attention(OmegaConf.to_container(self.cfg, resolve=True)))
        before = flatten(with_full_attention(saved))
        changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
        model = [k for k in changed if k.startswith("model.")]
        if model:
            k = model[0]
            raise TrainingError(
                f"{path} holds another model ({k}={before.get(k)!r}, now {now.get(k)!r}); "
                "use a new run_dir or the same model settings"
            )
        for k in changed:
            log.warning(
                "resuming with a changed setting: %s=%r (was %r)", k, now.get(k), before.get(k)
            )

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def valid_loss(self) -> tuple[float, float]:
        """Teacher-forced per-token label-smoothed loss and NLL on the validation set."""
        self.model.eval()
        total, nll_total, ntok = 0.0, 0.0, 0
        for idx in self.valid_batcher.epoch_batches(0):
            batch = self.valid_batcher.batch(idx).to(self.device)
            with self.autocast():
                logits = self.model(batch.src, batch.src_mask, batch.tgt_in)
            loss = sequence_loss(logits, batch.tgt_out, self.pad_id, self.t.label_smoothing)
            nll = sequence_loss(logits, batch.tgt_out, self.pad_id, 0.0)
            total, nll_total = total + loss.item(), nll_total + nll.item()
            ntok += int((batch.tgt_out != self.pad_id).sum())
        self.model.train()
        return total / ntok, nll_total / ntok

    def translate(self, split_name: str, decode_cfg) -> list[str]:
        self.model.eval()
        split = self.splits[split_name]
        with self.autocast():
            hyps = translate_lines(
                self.model,
                split.src_text,
                self.src_tok,
                self.tgt_tok,
                decode_cfg,
                self.device,
                self.cfg.data.max_len,
            )
        self.model.train()
        return hyps

    def valid_bleu(self) -> float:
        greedy = OmegaConf.create(
            {
                "beam_size": 1,
                "max_tokens": self.cfg.decode.max_tokens,
                "max_len_a": self.cfg.decode.max_len_a,
                "max_len_b": self.cfg.decode.max_len_b,
            }
        )
        hyps = self.translate(self.cfg.data.valid_split, greedy)
        return bleu(hyps, self.splits[self.cfg.data.valid_split].tgt_text)[0]

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # -- training -------------------------------------------------------------------------
    def batches(self):
        """Endless (epoch, position, Batch) stream starting at the saved position."""
        while True:
            plan = self.batcher.epoch_batches(self.epoch)
            self.epoch_len = len(plan)
            for pos in range(self.batch_in_epoch, len(plan)):
                yield pos, self.batcher.batch(plan[pos])
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, micro_batches) -> tuple[torch.Tensor, int] | None:
        """One optimizer update over ``accum_steps`` micro-batches, normalised by tokens.
        Returns (summed loss, target tokens), or None when the update was skipped because
        the gradient norm was NaN/inf (the weights are then unchanged)."""
        ntok = sum(int((b.tgt_out != self.pad_id).sum()) for b in micro_batches)
        total = self.accumulate(micro_batches, ntok)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip_norm)
        finite = bool(torch.isfinite(norm))  # the one host sync per update: needed to skip
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # with fp16, a skipped update also lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            return None
        self.scheduler.step()
        self.train_tokens += ntok
        return total, ntok

    def accumulate(self, micro_batches, ntok: int) -> torch.Tensor:
        """Forward and backward over the micro-batches. On out-of-memory the whole update is
        retried with every micro-batch split in halves (``trainer.oom_retries`` times; the
        gradient is the same since losses are summed and divided by ``ntok``), then fails
        with one line naming the batch shape."""
        for attempt in range(self.t.oom_retries + 1):
            try:
                total = torch.zeros((), device=self.device)
                for b in micro_batches:
                    b = b.to(self.device, non_blocking=True)
                    with self.autocast():
                        logits = self.model(b.src, b.src_mask, b.tgt_in)
                    loss = sequence_loss(logits, b.tgt_out, self.pad_id, self.t.label_smoothing)
                    self.scaler.scale(loss / ntok).backward()
                    total += loss.detach()
                return total
            except torch.OutOfMemoryError:
                pass  # handled below, once the traceback (and the tensors it holds) is gone
            logits = loss = None
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            shapes = " + ".join(
                f"src {tuple(b.src.shape)} tgt {tuple(b.tgt_out.shape)}" for b in micro_batches
            )
            if attempt == self.t.oom_retries or all(len(b.src) == 1 for b in micro_batches):
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
        raise AssertionError("unreachable")

    def skipped_update(self) -> None:
        """Count a NaN/inf update; abort after ``trainer.max_nonfinite`` in a row."""
        self.nonfinite_in_a_row += 1
        log.warning(
            "step %d: loss or gradient is NaN/inf; update skipped (%d in a row)",
            self.step + 1,
            self.nonfinite_in_a_row,
        )
        if self.nonfinite_in_a_row >= self.t.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} updates in a row had a NaN/inf loss or gradient "
                f"(at step {self.step + 1}); lower trainer.optimizer.lr or check the data "
                f"(trainer.max_nonfinite={self.t.max_nonfinite})"
            )

    def on_signal(self, signum, _frame):
        self.stop_signal = signum

    def run(self) -> dict:
        t = self.t
        resumed = t.resume and self.resume()
        train_log = CsvLog(
            self.run_dir / "train_log.csv",
            ["step", "epoch", "loss", "lr", "tokens_per_s", "pad_frac"],
        )
        valid_log = CsvLog(
            self.run_dir / "valid_log.csv",
            [
                "step",
                "epoch",
                "train_seconds",
                "valid_loss",
                "valid_nll",
                "valid_ppl",
                "valid_bleu",
            ],
        )
        if resumed:  # rows written after that checkpoint are trained again: drop them
            train_log.truncate_after(self.step)
            valid_log.truncate_after(self.step)
        old_handlers = {
            s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not t.progress_bar,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        stream, stop_reason = self.batches(), None
        if self.step >= t.max_steps:  # a finished run started again: nothing left to train
            stop_reason = f"already at trainer.max_steps={t.max_steps}"
        self.model.train()
        window_loss, window_tok, window_pad, window_start = 0.0, 0, 0.0, time.perf_counter()
        max_seconds = t.max_time_minutes * 60 if t.max_time_minutes else float("inf")
        try:
            while stop_reason is None:
                micro = []
                for _ in range(t.accum_steps):
                    pos, batch = next(stream)
                    micro.append(batch)
                    window_pad += self.batcher.padding_fraction(batch)
                step_start = time.perf_counter()
                result = self.train_step(micro)
                self.batch_in_epoch = pos + 1
                if result is None:
                    self.skipped_update()
                    stop_reason = self.signal_reason()
                    continue
                self.nonfinite_in_a_row = 0
                loss_sum, ntok = result
                self.step += 1
                window_loss, window_tok = window_loss + loss_sum, window_tok + ntok
                if self.step % t.log_every == 0:
                    loss = float(window_loss) / window_tok  # the only host sync in the loop
                    seconds = time.perf_counter() - window_start
                    row = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "loss": round(loss, 4),
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": round(window_tok / seconds),
                        "pad_frac": round(window_pad / (t.log_every * t.accum_steps), 3),
                    }
                    train_log.write(row)
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        lr=f"{row['lr']:.2e}",
                        tok_s=row["tokens_per_s"],
                        ep=self.epoch,
                    )
                    window_loss, window_tok, window_pad = 0.0, 0, 0.0
                    window_start = time.perf_counter()
                self.train_seconds += time.perf_counter() - step_start
                bar.update(1)
                stop_reason = self.maybe_evaluate(valid_log, max_seconds)
                stop_reason = self.signal_reason() or stop_reason
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.step != self.saved_step:
            self.save_checkpoint()
        log.info("stopped at step %d: %s", self.step, stop_reason)
        if self.stop_signal is not None:
            raise KeyboardInterrupt(
                f"interrupted at step {self.step}; last.pt saved in "
                f"{self.ckpt_dir}; run the same command to resume"
            )
        return {"stop_reason": stop_reason}

    def signal_reason(self) -> str | None:
        if self.stop_signal is None:
            return None
        return f"signal {signal.Signals(self.stop_signal).name}"

    def maybe_evaluate(self, valid_log, max_seconds) -> str | None:
        """Validation, checkpoints and stopping decisions after a step; returns a reason to
        stop or None."""
        t = self.t
        epochs_done = self.epoch + (self.batch_in_epoch >= self.epoch_len)
        at_end = self.step >= t.max_steps or epochs_done >= t.max_epochs
        out_of_time = self.train_seconds >= max_seconds
        at_end = at_end or out_of_time
        if not (self.step % t.eval_every == 0 or at_end):
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
        if self.step % t.bleu_every == 0 or at_end:
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
        log.info(
            "step %d: valid loss %.3f ppl %.2f bleu %s",
            self.step,
            loss,
            row["valid_ppl"],
            row["valid_bleu"],
        )
        last = self.save_checkpoint()
        if improved:
            checkpoint.link_or_copy(last, self.ckpt_dir / "best.pt")
        if at_end and stop is None:
            stop = "time limit" if out_of_time else "step/epoch limit"
        return stop

    def finish(self) -> dict:
        """Translate valid and test splits with the best checkpoint and score them."""
        best = self.ckpt_dir / "best.pt"
        if best.is_file():
            checkpoint.unwrap(self.model).load_state_dict(checkpoint.load(best)["model"])
        metrics = {
            "model": self.cfg.model._target_,
            "parameters": self.model.num_parameters(),
            "steps": self.step,
            "epochs": self.epoch,
            "best_step": self.best_step,
            "best_valid_bleu": round(self.best_bleu, 2),
            "train_seconds": round(self.train_seconds, 1),
            "train_tokens_per_s": round(self.train_tokens / max(self.train_seconds, 1e-9)),
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "decode": OmegaConf.to_container(self.cfg.decode),
        }
        d = self.cfg.data
        for name in [d.valid_split, *d.test_splits]:
            start = time.perf_counter()
            hyps = self.translate(name, self.cfg.decode)
            seconds = time.perf_counter() - start
            (self.run_dir / f"{name}.hyp").write_text("".join(h + "\n" for h in hyps), "utf-8")
            scores = score_all(hyps, self.splits[name].tgt_text)
            scores["decode_sentences_per_s"] = round(len(hyps) / seconds, 1)
            metrics[name] = scores
            log.info(
                "%s: BLEU %.2f chrF %.2f (%s)",
                name,
                scores["bleu"],
                scores["chrf"],
                scores["bleu_signature"],
            )
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


class CsvLog:
    """Append rows to a CSV file, writing the header once (resume appends)."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fields).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (atomically rewritten)."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["step"] and int(r["step"]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


def with_full_attention(config: dict) -> dict:
    """``config`` with ``model.attention`` spelled out in full (``AttentionConfig``), so a run
    saved before the key existed (which means the defaults) resumes under the defaults."""
    model = config.get("model") or {}
    if "attention" not in model and not str(model.get("_target_", "")).endswith(".Transformer"):
        return config
    full = dataclasses.asdict(attention_config(model.get("attention")))
    return {**config, "model": {**model, "attention": full}}


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def train(cfg) -> dict:
    """Train per ``cfg`` into ``cfg.run_dir``; returns the final metrics dict."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as e:
        raise TrainingError(f"run_dir={run_dir} is not writable: {e.strerror or e}") from e
    trainer = Trainer(cfg, run_dir)
    trainer.run()
    return trainer.finish()
