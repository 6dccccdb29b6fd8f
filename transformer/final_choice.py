"""The final translations' weights and decoding setting, chosen on the validation split.

When training ends, the candidates are best.pt (or the weights in memory, when there is no
best.pt) and, with ``trainer.final.average_last``, the average of the newest step
checkpoints; the settings are ``decode`` as configured and, for beam search, every other
combination of ``trainer.final.beam_sizes`` and ``trainer.final.length_penalties``. Every
candidate is decoded with every setting, each hypothesis file is kept under RUN/final/, and
the highest cased BLEU on valid wins (ties: best.pt with decode as configured).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from . import checkpoint
from .average import average
from .checkpoint import CheckpointError
from .metrics import bleu

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def final_settings(decode, final) -> list:
    """decode as configured first; for beam search also every other combination of beam
    size (decode.beam_size, final.beam_sizes) and length penalty (decode.length_penalty,
    final.length_penalties), ``final`` being ``trainer.final``."""
    if decode.beam_size <= 1 or decode.sample:
        return [decode]
    sizes = dict.fromkeys([decode.beam_size, *final.beam_sizes])
    alphas = dict.fromkeys([decode.length_penalty, *final.length_penalties])
    return [
        OmegaConf.merge(decode, {"beam_size": k, "length_penalty": a})
        for k in sizes
        for a in alphas
    ]


class FinalChoice:
    """Chooses, for a trainer whose training has ended, the weights and the decoding setting
    of its final translations (``choose``), and loads the chosen weights into its model."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.last_weights = None  # the weights training ended with, if other candidates vie

    def candidates(self) -> list[Path | None]:
        """The weights the final translations may use: best.pt (None: the weights in memory,
        when there is no best.pt) and, with ``trainer.final.average_last``, the
        average of the newest step checkpoints (as many as were kept, at least 2), which
        rank 0 writes to checkpoints/avg_last{N}.pt."""
        tr = self.trainer
        best = tr.ckpt_dir / "best.pt"
        found = [best if best.is_file() else None]
        averaged = None
        n = tr.t.final.average_last
        if tr.dist.is_main and n >= 2:
            steps = checkpoint.step_checkpoints(tr.ckpt_dir)[:n]
            if len(steps) >= 2:
                path = tr.ckpt_dir / f"avg_last{len(steps)}.pt"
                try:
                    checkpoint.save(path, average(steps))
                    averaged = str(path)
                except CheckpointError as e:  # e.g. a step file damaged on disk
                    log.warning("final translations without averaging: %s", e)
            else:
                log.info(
                    "trainer.final.average_last: %d step checkpoint(s) kept, no average", len(steps)
                )
        averaged = tr.dist.broadcast(averaged)
        if averaged:
            found.append(Path(averaged))
        return found

    def use_weights(self, path: Path | None) -> dict:
        """Load a candidate's weights into the model; what the metrics say about them. None:
        the weights training ended with (kept aside by ``choose`` when other candidates
        are loaded over them)."""
        tr = self.trainer
        if path is None:
            if self.last_weights is not None:
                checkpoint.unwrap(tr.model).load_state_dict(self.last_weights)
            return {"checkpoint": None, "step": tr.step}
        ckpt = checkpoint.load(path)
        checkpoint.unwrap(tr.model).load_state_dict(ckpt["model"])
        about = {
            "checkpoint": str(path.relative_to(tr.run_dir)),
            "step": ckpt["progress"]["step"],
        }
        if "averaged_from" in ckpt:
            about["averaged_steps"] = [s["step"] for s in ckpt["averaged_from"]]
        return about

    def keep_hyps(self, split: str, tag: str, hyps: list[str]) -> str:
        """Rank 0 writes a candidate's hypotheses to RUN/final/SPLIT.TAG.hyp, so that its
        score can be recomputed; returns that path relative to the run."""
        path = Path("final") / f"{split}.{tag}.hyp"
        run_dir = self.trainer.run_dir
        if self.trainer.dist.is_main:
            (run_dir / path.parent).mkdir(exist_ok=True)
            (run_dir / path).write_text("".join(h + "\n" for h in hyps), "utf-8")
        return str(path)

    def choose(self) -> tuple[dict, object, tuple[list[str], float] | None]:
        """Score every candidate (``candidates``) with every setting (``final_settings``)
        by cased BLEU on the validation split; the highest wins, ties going to best.pt with
        decode as configured. Loads the winner's weights; returns what metrics.json says of
        the choice, its decode config and, when valid was decoded here, the winner's valid
        hypotheses with their decoding seconds."""
        tr = self.trainer
        candidates, settings = self.candidates(), final_settings(tr.cfg.decode, tr.t.final)
        if None in candidates and len(candidates) > 1:  # loading the others overwrites them
            state = checkpoint.unwrap(tr.model).state_dict()
            self.last_weights = {k: v.detach().clone() for k, v in state.items()}
        if len(candidates) * len(settings) == 1:
            chosen = self.use_weights(candidates[0])
            used = {k: settings[0][k] for k in ("beam_size", "length_penalty")}
            return {**chosen, **used, "chosen_on": None}, settings[0], None
        split = tr.cfg.data.valid_split
        refs = tr.splits[split].tgt_text
        rows, win = [], None
        for path in candidates:
            about = self.use_weights(path)
            for setting in settings:
                start = time.perf_counter()
                hyps = tr.translate(split, setting)
                seconds = time.perf_counter() - start
                score = bleu(hyps, refs)[0]
                row = {
                    **about,
                    "beam_size": setting.beam_size,
                    "length_penalty": setting.length_penalty,
                    "valid_bleu": round(score, 2),
                    "hypotheses": self.keep_hyps(split, row_tag(about, setting), hyps),
                }
                rows.append(row)
                log.info("%s BLEU %.2f: %s", split, score, describe(row))
                if win is None or score > win[0]:
                    win = (score, path, setting, row, (hyps, seconds))
        _, path, setting, row, valid_hyps = win
        if path != candidates[-1]:  # the last candidate's weights are loaded already
            self.use_weights(path)
        log.info("final translations (chosen on %s): %s", split, describe(row))
        chosen = {k: v for k, v in row.items() if k not in ("valid_bleu", "hypotheses")}
        return {**chosen, "chosen_on": split, "candidates": rows}, setting, valid_hyps


def row_tag(about: dict, setting) -> str:
    """'avg_last5.beam5.lp1.4': a final candidate's file-name tag."""
    name = Path(about["checkpoint"]).stem if about["checkpoint"] else "last"
    return f"{name}.beam{setting.beam_size}.lp{setting.length_penalty}"


def describe(row: dict) -> str:
    """'avg_last5.pt (steps 4000-5000), beam 5, length penalty 1.4' for a final candidate."""
    name = Path(row["checkpoint"]).name if row["checkpoint"] else "the last weights"
    steps = row.get("averaged_steps")
    where = f"steps {steps[-1]}-{steps[0]}" if steps else f"step {row['step']}"
    return f"{name} ({where}), beam {row['beam_size']}, length penalty {row['length_penalty']}"
