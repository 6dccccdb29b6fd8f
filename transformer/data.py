"""Parallel corpora -> subword ids -> length-bucketed token batches.

Sources (``conf/data/*.yaml``):
  (a) a local directory ``$MT_DATA_DIR/<name>/`` of ``{split}.{lang}`` or ``{split}.{lang}.gz``
      files, one sentence per line, line i of each language aligned;
  (b) a Hugging Face Hub dataset (``data.hub_name``), with one column per language (e.g.
      ``bentrevett/multi30k``) or a ``translation`` column of {lang: text} dicts (WMT/IWSLT).
Both come back as a ``datasets.Dataset`` with columns ``src`` and ``tgt``.

Batches hold up to ``max_tokens`` padded tokens (the longer side counts), built from
length-sorted examples so padding is small, and reshuffled every epoch from the seed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .seq2seq import Batch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing data; the message names the file, key or line."""


# -- reading ----------------------------------------------------------------------------------
def find_file(directory: Path, split: str, lang: str) -> Path:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        if (directory / name).is_file():
            return directory / name
    found = sorted({p.name.split(".")[1] for p in directory.glob(f"{split}.*") if "." in p.name})
    raise DataError(
        f"no file {split}.{lang}[.gz] in {directory} "
        f"(languages found for split '{split}': {', '.join(found) or 'none'})"
    )


# C0 controls except tab and newline, DEL, C1 controls, and the Unicode line/paragraph
# separators (tools that honour them would split the line); each becomes a space.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def decode_lines(raw: bytes, source) -> list[str]:
    """Split bytes on ``\\n`` only into lines without newline or CR. Repairs are counted and
    reported in one warning each, naming ``source`` and the first line number: invalid
    UTF-8 is replaced with U+FFFD; control characters become spaces; a leading byte-order
    mark is dropped. The number of lines never changes."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out, bad_utf8, control = [], [], []
    for i, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            bad_utf8.append(i)
        text = text.rstrip("\r")
        if CONTROL_CHARS.search(text):
            text = CONTROL_CHARS.sub(" ", text)
            control.append(i)
        out.append(text)
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    for found, what in (
        (bad_utf8, "not valid UTF-8; bytes replaced with U+FFFD"),
        (control, "with control characters; replaced with spaces"),
    ):
        if found:
            log.warning("%s: %d line(s) %s (first: line %d)", source, len(found), what, found[0])
    return out


def read_lines(path: Path) -> list[str]:
    """Lines of a (gzipped) UTF-8 file (see ``decode_lines``); an empty file is an error."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise DataError(f"{path} is empty")
    return decode_lines(raw, path)


def load_local(directory: Path, split: str, src_lang: str, tgt_lang: str):
    """Read ``split`` from a directory of line-aligned files into a Dataset(src, tgt)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory} (set MT_DATA_DIR or data.data_dir)")
    src_path, tgt_path = (
        find_file(directory, split, src_lang),
        find_file(directory, split, tgt_lang),
    )
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}"
        )
    # The fingerprint names the files and their versions; computing it this way skips
    # datasets' pickling of the whole table (slow, and broken on some pyarrow/dill pairs).
    stamp = "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (src_path, tgt_path)
    )
    fingerprint = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return Dataset(InMemoryTable.from_pydict({"src": src, "tgt": tgt}), fingerprint=fingerprint)


def load_hub(name: str, config: str | None, split: str, src_lang: str, tgt_lang: str):
    """Load ``split`` of a Hub dataset (or a local dataset folder) as Dataset(src, tgt)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # network, missing split, unknown name: one clear line
        raise DataError(f"could not load Hub dataset {name!r} split {split!r}: {e}") from e
    if "translation" in ds.column_names:
        ds = ds.map(
            lambda b: {
                "src": [t[src_lang] for t in b["translation"]],
                "tgt": [t[tgt_lang] for t in b["translation"]],
            },
            batched=True,
            remove_columns=ds.column_names,
        )
        return ds
    for lang in (src_lang, tgt_lang):
        if lang not in ds.column_names:
            raise DataError(
                f"Hub dataset {name!r} has no column {lang!r} (columns: {ds.column_names})"
            )
    ds = ds.select_columns([src_lang, tgt_lang])
    return ds.rename_columns({src_lang: "src", tgt_lang: "tgt"})


def load_split(data_cfg, split: str):
    """Dataset(src, tgt) for ``split`` (train / valid / test2016 ...) per the data config."""
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    for key, lang in (("data.src_lang", src_lang), ("data.tgt_lang", tgt_lang)):
        if lang not in data_cfg.langs:
            raise DataError(
                f"{key}={lang!r}: corpus {data_cfg.name} has languages {list(data_cfg.langs)}"
            )
    if src_lang == tgt_lang:
        raise DataError(f"data.src_lang and data.tgt_lang are both {src_lang!r}")
    if data_cfg.data_dir:
        return load_local(Path(data_cfg.data_dir) / data_cfg.name, split, src_lang, tgt_lang)
    if not data_cfg.hub_name:
        raise DataError(f"data.data_dir is unset and corpus {data_cfg.name} has no data.hub_name")
    hub_split = data_cfg.hub_splits.get(split, split)
    return load_hub(data_cfg.hub_name, data_cfg.hub_config, hub_split, src_lang, tgt_lang)


# -- encoding ---------------------------------------------------------------------------------
@dataclass
class EncodedSplit:
    """Subword ids of one split; ``src[i]``/``tgt[i]`` are int32 arrays without BOS/EOS."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    src_text: list[str]
    tgt_text: list[str]

    def __len__(self) -> int:
        return len(self.src)


def encode_split(ds, src_tok, tgt_tok, max_len: int, filter_long: bool, name: str) -> EncodedSplit:
    """Tokenize a Dataset(src, tgt). Training splits drop empty and overlong pairs
    (``filter_long``); evaluation splits keep every line and truncate overlong sources,
    so hypotheses stay line-aligned with references. Counts are logged."""
    src_text, tgt_text = [s.strip() for s in ds["src"]], [t.strip() for t in ds["tgt"]]
    src_ids = [np.asarray(x, dtype=np.int32) for x in src_tok.encode(src_text)]
    tgt_ids = [np.asarray(x, dtype=np.int32) for x in tgt_tok.encode(tgt_text)]
    if filter_long:
        keep = [
            i
            for i in range(len(src_ids))
            if 0 < len(src_ids[i]) <= max_len and 0 < len(tgt_ids[i]) <= max_len
        ]
        dropped = len(src_ids) - len(keep)
        empty = sum(1 for i in range(len(src_ids)) if not len(src_ids[i]) or not len(tgt_ids[i]))
        log.info(
            "%s: %d pairs, dropped %d (%d with an empty side, %d longer than "
            "data.max_len=%d tokens)",
            name,
            len(keep),
            dropped,
            empty,
            dropped - empty,
            max_len,
        )
        if not keep:
            raise DataError(
                f"{name}: no sentence pairs left after filtering (data.max_len={max_len})"
            )
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return EncodedSplit(pick(src_ids), pick(tgt_ids), pick(src_text), pick(tgt_text))
    long = sum(1 for s in src_ids if len(s) > max_len)
    if long:
        log.warning(
            "%s: %d source sentence(s) longer than %d tokens truncated", name, long, max_len
        )
    return EncodedSplit([s[:max_len] for s in src_ids], tgt_ids, src_text, tgt_text)


# -- batching ---------------------------------------------------------------------------------
def plan_batches(lengths: np.ndarray, max_tokens: int, rng: np.random.Generator | None):
    """Group example indices into batches of at most ``max_tokens`` padded tokens.

    Examples are sorted by length (ties broken at random when ``rng`` is given), cut greedily
    into batches, and the batch order shuffled. Without ``rng`` the order is deterministic.
    :param lengths: (N,) padded length each example needs
    :return: list of int arrays of example indices
    """
    if rng is None:
        order = np.argsort(lengths, kind="stable")
    else:
        order = np.lexsort((rng.random(len(lengths)), lengths))
    batches, start, longest = [], 0, 0
    for pos, idx in enumerate(order):
        longest_if_added = max(longest, lengths[idx])
        if pos > start and longest_if_added * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, longest_if_added = pos, lengths[idx]
        longest = longest_if_added
    batches.append(order[start:])
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(split: EncodedSplit, idx: np.ndarray, pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """Pad examples ``idx`` into a Batch: src + EOS, BOS + tgt, tgt + EOS."""
    src = [split.src[i] for i in idx]
    tgt = [split.tgt[i] for i in idx]
    B, S, T = len(idx), max(len(s) for s in src) + 1, max(len(t) for t in tgt) + 1
    src_arr = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), pad_id, dtype=np.int64)
    for b, (s, t) in enumerate(zip(src, tgt)):
        src_arr[b, : len(s)], src_arr[b, len(s)] = s, eos_id
        tgt_in[b, 0], tgt_in[b, 1 : len(t) + 1] = bos_id, t
        tgt_out[b, : len(t)], tgt_out[b, len(t)] = t, eos_id
    src_t = torch.from_numpy(src_arr)
    return Batch(src_t, src_t != pad_id, torch.from_numpy(tgt_in), torch.from_numpy(tgt_out))


class TokenBatcher:
    """Epoch-wise token batches over an EncodedSplit, reproducible from (seed, epoch).

    ``epoch_batches(epoch)`` gives the same list for the same epoch, so a resumed run
    skips to its position within the epoch and sees exactly the batches it would have.
    ``rank``/``world_size`` give each distributed process its own shard of the batches.
    """

    def __init__(
        self,
        split: EncodedSplit,
        max_tokens: int,
        seed: int,
        special_ids: tuple,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.split, self.max_tokens, self.seed, self.shuffle = split, max_tokens, seed, shuffle
        self.pad_id, self.bos_id, self.eos_id = special_ids
        self.rank, self.world_size = rank, world_size
        self.lengths = np.array(
            [max(len(s), len(t)) + 1 for s, t in zip(split.src, split.tgt)], dtype=np.int64
        )
        longest = int(self.lengths.max())
        if longest > max_tokens:
            raise DataError(
                f"data.max_tokens={max_tokens} is smaller than the longest "
                f"example ({longest} tokens); raise it or lower data.max_len"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches = plan_batches(self.lengths, self.max_tokens, rng)
        if self.world_size > 1:  # equal count per rank so collective ops stay in step
            n = len(batches) // self.world_size * self.world_size
            batches = batches[self.rank : n : self.world_size]
        return batches

    def batch(self, idx: np.ndarray) -> Batch:
        return collate(self.split, idx, self.pad_id, self.bos_id, self.eos_id)

    def padding_fraction(self, batch: Batch) -> float:
        real = int(batch.src_mask.sum()) + int((batch.tgt_out != self.pad_id).sum())
        return 1.0 - real / (batch.src.numel() + batch.tgt_out.numel())
