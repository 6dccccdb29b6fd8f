"""Rebuild a model from a checkpoint and translate lines of text with it.

Used by translate.py and by the trainer (validation BLEU, final test translations), so both
decode the same way: inputs sorted by length, cut into batches of ``max_tokens``, decoded with
greedy search, beam search or sampling (``search``), and restored to input order. Empty lines
give empty outputs.

Decode options are completed from conf/decode/greedy.yaml, the one file that holds every
decode key and its default (beam.yaml and sample.yaml extend it), so a config built by hand,
such as the trainer's greedy one for validation, decodes with the same defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from . import checkpoint
from .data import plan_batches
from .search import Hypothesis, beam_search, greedy_search, sample_search
from .tokenizer import Tokenizer, file_sha256
from .values import is_count, is_flag, is_number, is_seed

log = logging.getLogger(__name__)

DECODE_DEFAULTS = Path(__file__).resolve().parent.parent / "conf" / "decode" / "greedy.yaml"


def build_model(model_cfg, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
    """Instantiate ``conf/model/*.yaml`` with the sizes that only the data knows. A model that
    refuses its settings raises its own ValueError (which names the key), not Hydra's
    wrapper of it; an unknown key is a ValueError naming the model."""
    try:
        return instantiate(
            model_cfg, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, pad_id=pad_id
        )
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise ValueError(f"model ({model_cfg.get('_target_')}): {cause}") from None
        raise


def trial_build(model_cfg) -> torch.nn.Module:
    """The model's own checks of ``model_cfg`` (sizes, dropout, attention options, unknown
    keys), before any data is read: a trial build on the meta device, with a stand-in
    vocabulary, which allocates nothing and draws no random numbers; returns it. The
    model's module is imported first, outside the meta device, so that no tensor a module
    makes as it is imported lands there."""
    with contextlib.suppress(ImportError, ValueError):  # else the build names the problem
        importlib.import_module(str(model_cfg.get("_target_", "")).rpartition(".")[0])
    with torch.device("meta"):
        return build_model(model_cfg, src_vocab_size=8, tgt_vocab_size=8, pad_id=0)


# what translating needs of a checkpoint (training's own keys come on top)
INFERENCE_KEYS = ("model", "model_kwargs", "config", "tokenizer")
TOKENIZER_KEYS = ("src", "src_sha256", "tgt", "tgt_sha256")


def load_tokenizers(ckpt: dict, ckpt_path: Path) -> tuple[Tokenizer, Tokenizer]:
    """The tokenizers a checkpoint names, relative to its run directory, hash-checked."""
    run_dir = ckpt_path.resolve().parent.parent
    toks = []
    for side in ("src", "tgt"):
        rel, digest = ckpt["tokenizer"][side], ckpt["tokenizer"][f"{side}_sha256"]
        path = run_dir / rel
        if not path.is_file():
            raise checkpoint.CheckpointError(
                f"{ckpt_path}: its {side} tokenizer {path} is missing (the run directory "
                "must keep the tokenizer/ folder beside checkpoints/)"
            )
        if file_sha256(path) != digest:
            raise checkpoint.CheckpointError(
                f"{ckpt_path}: tokenizer {path} does not match the one it was trained with"
            )
        toks.append(Tokenizer(path))
    return toks[0], toks[1]


def load_for_inference(ckpt_path: str | Path, device: torch.device):
    """(model in eval mode on ``device``, src tokenizer, tgt tokenizer, config dict)."""
    ckpt_path = Path(ckpt_path)
    return from_checkpoint(checkpoint.load(ckpt_path), ckpt_path, device)


def from_checkpoint(ckpt: dict, ckpt_path: Path, device: torch.device):
    """``load_for_inference`` of a checkpoint already read from ``ckpt_path``."""
    checkpoint.require(ckpt, ckpt_path, INFERENCE_KEYS)
    checkpoint.require(ckpt["config"], ckpt_path, ("model", "data"), "config")
    checkpoint.require(ckpt["tokenizer"], ckpt_path, TOKENIZER_KEYS, "tokenizer")
    src_tok, tgt_tok = load_tokenizers(ckpt, ckpt_path)
    cfg = ckpt["config"]
    model = build_model(OmegaConf.create(cfg["model"]), **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), src_tok, tgt_tok, cfg


def some_numbers(numbers: list[int], most: int = 10) -> str:
    """The first ``most`` of ``numbers`` (line numbers, for a warning), then "..."."""
    return ", ".join(map(str, numbers[:most])) + (", ..." if len(numbers) > most else "")


def encode_sources(lines: list[str], src_tok: Tokenizer, max_len: int) -> list[list[int]]:
    """Subword ids + EOS per line; lines longer than ``max_len`` are truncated with a warning
    naming the line number (1-based)."""
    ids = src_tok.encode([line.strip() for line in lines])
    long = [i for i, seq in enumerate(ids) if len(seq) > max_len]
    for i in long:
        ids[i] = ids[i][:max_len]
    if long:
        log.warning(
            "%d input line(s) longer than %d subwords truncated (line %s)",
            len(long),
            max_len,
            some_numbers([i + 1 for i in long]),
        )
    return [seq + [src_tok.eos_id] if seq else [] for seq in ids]


def decode_options(decode_cfg) -> DictConfig:
    """``decode_cfg`` over the defaults of conf/decode/greedy.yaml, checked (``check_decode``);
    an unknown key is an error."""
    base = OmegaConf.load(DECODE_DEFAULTS)
    OmegaConf.set_struct(base, True)
    try:
        opts = OmegaConf.merge(base, decode_cfg)
    except ConfigKeyError as e:  # OmegaConf's words: "Key 'beam' is not in struct"
        raise ValueError(
            f"decode.{e.key} is not a decode setting (they are: {', '.join(base)})"
        ) from e
    check_decode(opts)
    return opts


def check_decode(opts) -> None:
    """Decode options that would fail only once decoding starts (at the end of training), or
    would quietly mean something else (``beam_size=0`` decoded greedily), fail now, naming
    the key."""
    for key, least in (("beam_size", 1), ("nbest", 1), ("min_len", 0), ("max_tokens", 1),
                       ("top_k", 0)):  # fmt: skip
        value = opts[key]
        if not is_count(value, least):
            raise ValueError(f"decode.{key} must be an integer >= {least}, got {value!r}")
    if not is_seed(opts.seed):
        raise ValueError(f"decode.seed must be an integer in [0, 2**64), got {opts.seed!r}")
    for key, ok, allowed in (
        ("length_penalty", lambda v: v >= 0, "a number >= 0"),
        ("max_len_a", lambda v: v >= 0, "a number >= 0"),
        ("max_len_b", lambda v: v >= 0, "a number >= 0"),
        ("temperature", lambda v: v > 0, "a number > 0"),
        ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ):
        value = opts[key]
        if not (is_number(value) and ok(value)):
            raise ValueError(f"decode.{key} must be {allowed}, got {value!r}")
    if not is_flag(opts.sample):
        raise ValueError(f"decode.sample must be true or false, got {opts.sample!r}")
    if opts.sample and opts.beam_size > 1:
        raise ValueError(
            "decode.sample=true draws decode.nbest samples per input and needs "
            f"decode.beam_size=1, got {opts.beam_size} (use decode=sample)"
        )
    if not opts.sample and opts.nbest > opts.beam_size:
        raise ValueError(f"decode.nbest={opts.nbest} exceeds decode.beam_size={opts.beam_size}")


def search(
    model, src, src_mask, bos_id: int, eos_id: int, opts, generator=None, pad_id=None
) -> list[list[Hypothesis]]:
    """Decode a batch src (B, S) as ``opts`` (complete decode options) say: sampling when
    ``opts.sample``, else greedy for beam_size 1, else beam search. Returns n-best lists."""
    check_decode(opts)
    common = dict(
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        min_len=opts.min_len,
        max_len_a=opts.max_len_a,
        max_len_b=opts.max_len_b,
    )
    if opts.sample:
        return sample_search(
            model,
            src,
            src_mask,
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
            nbest=opts.nbest,
            generator=generator,
            **common,
        )
    if opts.beam_size == 1:
        return [[h] for h in greedy_search(model, src, src_mask, **common)]
    return beam_search(
        model,
        src,
        src_mask,
        beam_size=opts.beam_size,
        alpha=opts.length_penalty,
        nbest=opts.nbest,
        **common,
    )


@torch.no_grad()
def translate_ids(
    model,
    src_ids: list[list[int]],
    tgt_tok: Tokenizer,
    decode_cfg,
    device: torch.device,
    progress=None,
) -> list[list]:
    """Decode every non-empty id list; returns per input a list of (tokens, score) n-best
    (empty list for an empty input). ``progress`` is called with the number of sentences done.
    Sampling seeds one generator with ``decode.seed`` per call.
    """
    opts = decode_options(decode_cfg)
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.sample else None
    pad = tgt_tok.pad_id
    nonempty = np.array([i for i, s in enumerate(src_ids) if s], dtype=np.int64)
    results: list[list] = [[] for _ in src_ids]
    if len(nonempty) == 0:
        return results
    lengths = np.array([len(src_ids[i]) for i in nonempty])
    for chunk in plan_batches(lengths, opts.max_tokens, rng=None):
        idx = nonempty[chunk]
        S = max(len(src_ids[i]) for i in idx)
        src = torch.full((len(idx), S), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            src[row, : len(src_ids[i])] = torch.tensor(src_ids[i])
        src = src.to(device)
        ids = dict(bos_id=tgt_tok.bos_id, eos_id=tgt_tok.eos_id, pad_id=pad)
        nbest = search(model, src, src != pad, opts=opts, generator=generator, **ids)
        for row, i in enumerate(idx):
            results[i] = [(h.tokens, h.score) for h in nbest[row]]
        if progress is not None:
            progress(len(idx))
    return results


def translate_lines(
    model,
    lines: list[str],
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    decode_cfg,
    device: torch.device,
    max_src_len: int,
) -> list[str]:
    """Best translation of each line (detokenized), same count and order as ``lines``."""
    nbest = translate_ids(
        model, encode_sources(lines, src_tok, max_src_len), tgt_tok, decode_cfg, device
    )
    best = [hyps[0][0] if hyps else [] for hyps in nbest]
    return tgt_tok.decode(best)
