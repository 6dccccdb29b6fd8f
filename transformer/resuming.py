"""Resuming a run from its checkpoint, the pieces ``Trainer.resume`` is made of: which
changed settings are refused (model, tokenizer, optimizer class) and which only warn (every
other; a changed batch order in the middle of an epoch says what it does), the optimizer
state re-indexed for this run's parameter layout and precision, the schedule under this
run's peak lr, the random generators, and best.pt and the step files made those of the
checkpoint resumed from.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import checkpoint
from .attention import attention_config, stacked_from
from .precision import PrecisionError, merge_state
from .settings import TrainingError

log = logging.getLogger(__name__)

# What resuming reads of a checkpoint: one missing is a clear error, not a KeyError
TRAINING_KEYS = ("model", "config", "tokenizer", "optimizer", "scheduler", "scaler", "progress",
                 "rng")  # fmt: skip
# Settings that say which tokenizer a run has: a run resumes with the one in its run dir, so
# changing them there is refused. (A changed sample size or character coverage only warns:
# on a corpus smaller than the sample they give the same tokenizer.)
TOKENIZER_KEYS = tuple(
    f"data.{k}" for k in ("joint_vocab", "vocab_size", "spm_model_type", "src_lang", "tgt_lang")
)
# Settings that make an epoch's batches (its shuffle, its cut into batches, the pairs kept):
# the saved position within an epoch means another batch under another value
ORDER_KEYS = ("seed", "data.max_tokens", "data.max_len", "data.train_split")


def check_config(cfg, path: Path, saved: dict, progress: dict) -> None:
    """Refuse to resume the checkpoint at ``path`` (its config ``saved``, its ``progress``)
    under ``cfg`` with another model, tokenizer or optimizer class; warn about any other
    changed setting, and say what a changed batch order does to an epoch resumed midway."""
    now, before, changed = differences(cfg, saved)
    if why := refusal(path, now, before, changed):
        raise TrainingError(why)
    for k in changed:
        log.warning("resuming with a changed setting: %s=%r (was %r)", k, now.get(k), before.get(k))
    reordered = [k for k in changed if k in ORDER_KEYS]
    if reordered and progress["batch_in_epoch"] > 0:
        log.warning(
            "%s changed in the middle of epoch %d (%d batches done): the resumed position "
            "is taken in another batch order, so until epoch %d some training pairs come "
            "twice and others not at all; resume at an epoch's end, or keep the setting",
            ", ".join(reordered),
            progress["epoch"],
            progress["batch_in_epoch"],
            progress["epoch"] + 1,
        )


def differences(cfg, saved: dict) -> tuple[dict, dict, list[str]]:
    """``cfg`` and the config ``saved`` with a run, each flattened (dotted keys, the
    Transformer's attention spelled out), and the keys whose values differ, sorted."""
    now = flatten(with_full_attention(OmegaConf.to_container(cfg, resolve=True)))
    before = flatten(with_full_attention(saved))
    return now, before, sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))


def refusal(path, now: dict, before: dict, changed: list[str]) -> str | None:
    """Why the run saved in ``path`` (its flattened config ``before``) cannot resume under
    ``now`` (``changed``: the keys that differ): another model, tokenizer or optimizer
    class; None when it can."""
    refused = [("model", ("model.",)), ("tokenizer", TOKENIZER_KEYS)]
    refused.append(("optimizer", ("trainer.optimizer._target_",)))  # its state is another's
    for what, keys in refused:
        fatal = [k for k in changed if k.startswith(keys)]
        if fatal:
            k = fatal[0]
            return (
                f"{path} holds another {what} ({k}={before.get(k)!r}, now {now.get(k)!r}); "
                f"use a new run_dir or the same {what} settings"
            )
    return None


def refused_resume(run: Path, cfg) -> str | None:
    """Why ``cfg`` (composed, not yet run) cannot resume the run in the folder ``run``,
    judged against the config.yaml its last start wrote (the trainer checks the checkpoint
    itself later; this is for ``train.py`` to say it before Hydra writes its files over the
    run's own). None when it can, or when there is nothing to judge by."""
    saved = run / "config.yaml"
    candidates = checkpoint.resume_candidates(run / "checkpoints")
    if not saved.is_file() or not candidates or cfg.trainer.get("resume") is False:
        return None
    try:
        now, before, changed = differences(cfg, OmegaConf.to_container(OmegaConf.load(saved)))
    except Exception:  # not a config we can read: the trainer judges by the checkpoint
        return None
    return refusal(candidates[0], now, before, changed)


def with_full_attention(config: dict) -> dict:
    """``config`` with the Transformer's ``model.attention`` spelled out in full
    (``AttentionConfig``), so a run saved before the key existed (which means the defaults)
    resumes under the defaults. Other models are left alone: the RNN's ``model.attention``
    is the name of its scoring function, not an AttentionConfig."""
    model = config.get("model") or {}
    if not str(model.get("_target_", "")).endswith(".Transformer"):
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


def optimizer_state(
    path: Path, ckpt: dict, model: torch.nn.Module, optimizer, flat_params: list | None
) -> dict:
    """The state dict for ``optimizer`` from checkpoint ``ckpt`` (read from ``path``) of
    ``model``: re-indexed when an older layout of the model wrote it (e.g. separate q/k/v
    projections), merged into one flat parameter for bf16-weights' flat update
    (``flat_params``: the model's parameters, or None for a per-parameter update). The
    groups' settings are this run's (weight decay, betas, eps, ... as ``check_config``'s
    warning says; the lr by ``restore_schedule``), and so is the implementation of the
    update (fused, foreach, ...): a fused step passes arguments an unfused one rejects.
    Only the parameter indices are the checkpoint's."""
    optim = ckpt["optimizer"]
    saved_names = checkpoint.parameter_names(ckpt["model"], {n for n, _ in model.named_buffers()})
    if saved_names != [n for n, _ in model.named_parameters()]:
        try:
            optim = checkpoint.optimizer_state_for(model, saved_names, optim, stacked_from)
        except checkpoint.CheckpointError as e:
            raise TrainingError(f"{path}: {e}") from e
        log.info("%s: optimizer state re-indexed for this model's parameter layout", path)
    if flat_params is not None:
        try:
            optim = merge_state(optim, flat_params)
        except PrecisionError as e:
            raise TrainingError(f"{path}: {e}") from e
    groups = [
        {**saved, **{k: v for k, v in now.items() if k != "params"}}
        for saved, now in zip(optim["param_groups"], optimizer.param_groups)
    ]
    return {**optim, "param_groups": groups}


def restore_schedule(optimizer, scheduler, peak_lr: float, saved: dict) -> None:
    """Load the saved scheduler state (its step) with this run's ``peak_lr``, into the
    scheduler and the optimizer's groups (loaded already): a peak lr changed since the
    checkpoint (warned about by check_config) applies from the resumed update on, as a
    changed warmup does, instead of the saved one staying in force unseen."""
    step = saved["last_epoch"]
    peaks = [peak_lr] * len(optimizer.param_groups)
    lrs = [peak * f(step) for peak, f in zip(peaks, scheduler.lr_lambdas)]
    for group, peak, lr in zip(optimizer.param_groups, peaks, lrs):
        group.update(initial_lr=peak, lr=lr)
    scheduler.load_state_dict({**saved, "base_lrs": peaks, "_last_lr": lrs})


def rng_state() -> dict:
    """This process's random generators, as a checkpoint keeps them."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Set the generators to a checkpoint's ``rng_state()``."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        # one state per GPU the saving run saw: a machine with fewer takes the first ones
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])


def position_for(batch_in_epoch: int, before: int, now: int, epoch: int) -> int:
    """This run's position in ``epoch`` for a checkpoint saved by ``before`` processes at
    ``batch_in_epoch`` (a count of each rank's batches), resumed by ``now``. Rank r takes
    batches r, r + W, r + 2W, ... of the epoch's plan (``TokenBatcher.epoch_batches``), so
    the ranks saved at position p had trained the plan's first p * W batches together:
    under another count of processes the same position meant other batches, and some pairs
    came twice in that epoch and others not at all. Where p * W is not a multiple of the
    new count, the position is rounded down: up to ``now`` - 1 batches are trained again
    (which a warning says)."""
    if before == now or batch_in_epoch == 0:
        return batch_in_epoch
    done = batch_in_epoch * before
    position = done // now
    log.warning(
        "checkpoint saved by %d process(es) at batch %d of epoch %d, resumed by %d: the "
        "epoch's first %d batches are trained, so each process goes on from its batch %d%s",
        before, batch_in_epoch, epoch, now, done, position,
        f" ({done - position * now} batch(es) are trained again)" if done % now else "",
    )  # fmt: skip
    return position


def make_step_file(ckpt_dir: Path, path: Path, step: int, keep: int) -> None:
    """Link ``path`` (last.pt, written at an evaluation of ``step``) as its step file if a
    kill came between writing it and linking it: the final average takes the step files,
    and would have taken an older one in its place. Then prune to ``keep``, as the save."""
    own = ckpt_dir / f"step_{step:08d}.pt"
    if keep > 0 and not own.is_file():
        checkpoint.link_or_copy(path, own)
        log.warning("%s was not linked as %s (a kill came between): linked now", path, own.name)
    checkpoint.prune(ckpt_dir, keep)


def holds_step(path: Path, step: int) -> bool:
    """Whether the checkpoint at ``path`` loads and is the one written at ``step``."""
    try:
        return checkpoint.load(path)["progress"]["step"] == step
    except (checkpoint.CheckpointError, KeyError, TypeError):
        return False


def match_files(ckpt_dir: Path, path: Path, step: int, best_step: int) -> None:
    """Make best.pt and the step files of ``ckpt_dir`` those of the run resumed from
    ``path`` (at ``step``, its best BLEU at ``best_step``). A kill between writing last.pt
    and linking it as best.pt left an older best.pt; a resume from an older step file
    (last.pt damaged) left the newer step files, which failed to load, and a best.pt that
    may be one of them (the final choice then failed on it after all training) or from the
    steps lost: ``best_step``'s checkpoint is linked as best.pt again, or best.pt is removed
    (the final translations then use the last weights, unless a later BLEU gain writes it).
    best.pt is checked on every resume, also from last.pt: one damaged on its own failed
    only in the final choice."""
    best = ckpt_dir / "best.pt"
    if best_step == step > 0:  # (0: no BLEU yet, a stop before the first)
        checkpoint.link_or_copy(path, best)
    if path.name != "last.pt":
        for newer in checkpoint.step_checkpoints(ckpt_dir):  # tried first, failed
            if int(checkpoint.STEP_PATTERN.match(newer.name)[1]) > step:
                log.warning("%s: newer than the checkpoint resumed from, damaged: removed", newer)
                newer.unlink()
    if best_step == step > 0 or not best.is_file():
        return
    if holds_step(best, best_step):
        return
    kept = ckpt_dir / f"step_{best_step:08d}.pt"
    if kept.is_file() and holds_step(kept, best_step):
        checkpoint.link_or_copy(kept, best)
        log.warning("best.pt is not step %d's (the resumed run's best; damaged, or another "
                    "step's): %s linked as best.pt",
                    best_step, kept.name)  # fmt: skip
    else:
        best.unlink()
        log.warning(
            "best.pt is not step %d's (the resumed run's best), nor is that step kept: "
            "best.pt removed (a later BLEU gain writes it again)",
            best_step,
        )
