"""translate(cfg): the body of translate.py (files/stdin in, translations out, optional BLEU)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .metrics import score_all
from .trainer import pick_device
from .translator import load_for_inference, translate_lines

log = logging.getLogger(__name__)


def read_input(path: str | None) -> list[str]:
    """Lines of ``path`` (or stdin), undecodable bytes replaced with a warning."""
    raw = Path(path).read_bytes() if path else sys.stdin.buffer.read()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
        log.warning("input has bytes that are not UTF-8; replaced with U+FFFD")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def translate(cfg) -> list[str]:
    device = pick_device(cfg.device)
    model, src_tok, tgt_tok, train_cfg = load_for_inference(cfg.ckpt, device)
    lines = read_input(cfg.input)
    hyps = translate_lines(
        model, lines, src_tok, tgt_tok, cfg.decode, device, train_cfg["data"]["max_len"]
    )
    out = "".join(h + "\n" for h in hyps)
    if cfg.output:
        Path(cfg.output).write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    if cfg.ref:
        refs = read_input(cfg.ref)
        scores = score_all(hyps, refs)
        print(
            f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}\n"
            f"{scores['bleu_signature']}\n{scores['chrf_signature']}",
            file=sys.stderr,
        )
    return hyps
