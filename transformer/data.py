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
import zlib
from pathlib import Path

import numpy as np
import torch

from .seq2seq import Batch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing data; the message names the file, key or line."""


# -- reading ----------------------------------------------------------------------------------
def find_file(directory: Path, split: str, lang: str) -> Path:
    files = [directory / n for n in (f"{split}.{lang}", f"{split}.{lang}.gz")]
    files = [p for p in files if p.is_file()]
    if len(files) == 2:  # they may differ (one updated, the other stale): say which is read
        log.warning("both %s and %s exist: reading %s", files[0], files[1].name, files[0].name)
    if files:
        return files[0]
    # Another suffix (.xz, .bz2, .txt) is no file of ours: name it, not its language as found
    unread = sorted(p.name for p in directory.glob(f"{split}.{lang}.*"))
    if unread:
        raise DataError(
            f"no file {split}.{lang}[.gz] in {directory}, only {', '.join(unread)}: "
            f"corpora are read as plain text or .gz, so decompress it (or gzip it)"
        )
    found = sorted({p.name.split(".")[1] for p in directory.glob(f"{split}.*") if "." in p.name})
    raise DataError(
        f"no file {split}.{lang}[.gz] in {directory} "
        f"(languages found for split '{split}': {', '.join(found) or 'none'})"
    )


def missing_directory(directory: Path, split: str) -> DataError:
    """The corpus folder ``data.data_dir/data.name`` is not there; where ``data.data_dir``
    itself holds the files (the corpus's own folder given as the root), say so."""
    hint = " (set MT_DATA_DIR or data.data_dir)"
    root = directory.parent
    if any(root.glob(f"{split}.*")):
        hint = (
            f": files are read from data.data_dir/data.name/{{split}}.{{lang}}, and "
            f"{root} holds {split}.* itself: set data.data_dir="
            f"{root.parent} data.name={root.name}"
        )
    elif root.is_dir():  # the root is right, the corpus name is not
        corpora = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint = (
            f": data.data_dir={root} holds no corpus {directory.name!r} (data.name); its "
            f"folders: {', '.join(corpora) or 'none'}"
        )
    return DataError(f"data directory not found: {directory}{hint}")


# C0 controls except tab and newline, DEL, C1 controls, and the Unicode line/paragraph
# separators (tools that honour them would split the line); each becomes a space.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class LineRepairs:
    """Repairs one line at a time and reports them once per source (see ``decode_lines``)."""

    def __init__(self, source):
        self.source, self.bad_utf8, self.control, self.cr, self.count = source, [], [], [], 0

    def __call__(self, line: bytes) -> str:
        self.count += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            self.bad_utf8.append(self.count)
        text = text.rstrip("\r")
        if "\r" in text:
            self.cr.append(self.count)
        if CONTROL_CHARS.search(text):
            text = CONTROL_CHARS.sub(" ", text)
            self.control.append(self.count)
        if self.count == 1 and text.startswith("\ufeff"):
            text = text[1:]
        return text

    def report(self) -> None:
        for found, what in (
            (self.bad_utf8, "not valid UTF-8; bytes replaced with U+FFFD"),
            (self.control, "with control characters; replaced with spaces"),
            (
                self.cr,
                "with a carriage return inside: only \\n ends a line here, so a file "
                "with old Mac line ends (\\r alone) reads as one line",
            ),
        ):
            if found:
                log.warning(
                    "%s: %d line(s) %s (first: line %d)", self.source, len(found), what, found[0]
                )


def decode_lines(raw: bytes, source) -> list[str]:
    """Split bytes on ``\\n`` only into lines without newline or CR. Repairs are counted and
    reported in one warning each, naming ``source`` and the first line number: invalid
    UTF-8 is replaced with U+FFFD; control characters become spaces; a leading byte-order
    mark is dropped. The number of lines never changes."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    repair = LineRepairs(source)
    out = [repair(line) for line in lines]
    repair.report()
    return out


# What reading a damaged .gz raises: not gzip at all, cut short, or corrupt inside.
BAD_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)
GZIP_MAGIC = b"\x1f\x8b"  # never the start of UTF-8 text: a unit separator, then no character
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little and big endian; neither starts UTF-8 text


def open_binary(path: Path):
    """``path`` opened for reading bytes, gunzipped if it ends in .gz. A gzipped file without
    the suffix is an error, and so is UTF-16 text (a byte-order mark tells): read as UTF-8,
    either made lines of U+FFFD and control characters, reported only as repairs or as a
    line count mismatch with the other side."""
    f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    try:
        head = f.peek(2)[:2]
    except BAD_GZIP:  # not gzip at all: the caller names the file
        f.close()
        raise
    if head == GZIP_MAGIC and path.suffix != ".gz":
        f.close()
        raise DataError(f"{path} is gzip-compressed: name it {path.name}.gz (or gunzip it)")
    if head in UTF16_BOMS:
        f.close()
        raise DataError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark): convert it to "
            f"UTF-8, e.g. iconv -f UTF-16 -t UTF-8"
        )
    return f


def bad_gzip(path: Path | str, lines_read: int | None, err: Exception) -> DataError:
    where = f" after line {lines_read}" if lines_read else ""
    return DataError(f"{path}: not a readable gzip file{where} ({err})")


def iter_lines(path: Path):
    """Lines of a (gzipped) UTF-8 file, one at a time, repaired and reported as
    ``decode_lines`` does; an empty file or a damaged .gz is an error."""
    repair = LineRepairs(path)
    try:
        with open_binary(path) as f:
            for line in f:  # binary files split on b"\n" only, like decode_lines
                yield repair(line[:-1] if line.endswith(b"\n") else line)
    except BAD_GZIP as err:
        raise bad_gzip(path, repair.count, err) from None
    if repair.count == 0:
        raise DataError(f"{path} is empty")
    repair.report()


def read_lines(path: Path) -> list[str]:
    """Lines of a (gzipped) UTF-8 file (see ``decode_lines``); an empty file or a damaged
    .gz is an error."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except BAD_GZIP as err:
        raise bad_gzip(path, None, err) from None
    if not raw:
        raise DataError(f"{path} is empty")
    return decode_lines(raw, path)


def load_local(directory: Path, split: str, src_lang: str, tgt_lang: str):
    """Read ``split`` from a directory of line-aligned files into a Dataset(src, tgt)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not directory.is_dir():
        raise missing_directory(directory, split)
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
    fingerprint = file_stamp((src_path, tgt_path))
    return Dataset(InMemoryTable.from_pydict({"src": src, "tgt": tgt}), fingerprint=fingerprint)


def file_stamp(paths, salt: str = "") -> str:
    """A fingerprint of files from their path, size and mtime, without reading them (a file
    rewritten with its size and mtime kept looks unchanged, as to ``make``), and ``salt``."""
    stamp = salt + "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in map(Path, paths)
    )
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def unreachable(name: str, split: str, err: Exception) -> DataError:
    """A Hub dataset out of reach and not in HF's cache (HF_HOME): what to do instead."""
    from datasets import config

    said = f"could not load Hub dataset {name!r} split {split!r}: {err}; "
    if config.HF_HUB_OFFLINE:
        said += "HF_HUB_OFFLINE is set and the dataset is not in the Hugging Face cache; "
    said += (
        "train on local files instead: data.data_dir=DIR reads "
        "DIR/<data.name>/{split}.{lang}[.gz], or data.hub_name=a local dataset folder"
    )
    if not config.HF_HUB_OFFLINE:
        said += " (without network, HF_HUB_OFFLINE=1 fails at once instead of after retries)"
    return DataError(said)


def load_hub(
    name: str,
    config: str | None,
    split: str,
    src_lang: str,
    tgt_lang: str,
    revision: str | None = None,
    data_dir: str | None = None,
):
    """Load ``split`` of a Hub dataset (or a local dataset folder) as Dataset(src, tgt).

    Either one column per language, or the WMT/IWSLT layout: one ``translation`` column of
    {lang: text} structs, flattened (a zero-copy Arrow operation, no pass over the rows).
    ``revision``/``data_dir`` reach datasets stored as parquet on a branch, e.g.
    ``refs/convert/parquet`` with one folder per config (script-based datasets such as
    IWSLT/iwslt2017 load only that way in datasets >= 4).
    """
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split, revision=revision, data_dir=data_dir)
    except ConnectionError as e:  # not in HF's cache, and offline or no network
        raise unreachable(name, split, e) from e
    except Exception as e:  # missing split, unknown name: one clear line
        raise DataError(f"could not load Hub dataset {name!r} split {split!r}: {e}") from e
    prefix = ""
    if "translation" in ds.column_names:
        ds, prefix = ds.select_columns(["translation"]).flatten(), "translation."
    for lang in (src_lang, tgt_lang):
        if prefix + lang not in ds.column_names:
            raise DataError(
                f"Hub dataset {name!r} has no column {prefix + lang!r} (columns: {ds.column_names})"
            )
    ds = ds.select_columns([prefix + src_lang, prefix + tgt_lang])
    return ds.rename_columns({prefix + src_lang: "src", prefix + tgt_lang: "tgt"})


def check_langs(data_cfg) -> None:
    """The direction is two different languages of the corpus, else a DataError."""
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    for key, lang in (("data.src_lang", src_lang), ("data.tgt_lang", tgt_lang)):
        if lang not in data_cfg.langs:
            raise DataError(
                f"{key}={lang!r} is not among data.langs={list(data_cfg.langs)}, the "
                f"languages of corpus {data_cfg.name}; for a corpus of your own, list its "
                f"languages: 'data.langs=[{src_lang},{tgt_lang}]'"
            )
    if src_lang == tgt_lang:
        raise DataError(f"data.src_lang and data.tgt_lang are both {src_lang!r}")


def load_split(data_cfg, split: str):
    """Dataset(src, tgt) for ``split`` (train / valid / test2016 ...) per the data config."""
    check_langs(data_cfg)
    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    if data_cfg.data_dir:
        return load_local(Path(data_cfg.data_dir) / data_cfg.name, split, src_lang, tgt_lang)
    if not data_cfg.hub_name:
        raise DataError(f"data.data_dir is unset and corpus {data_cfg.name} has no data.hub_name")
    hub_split = (data_cfg.get("hub_splits") or {}).get(split, split)  # optional: names as ours
    return load_hub(
        data_cfg.hub_name,
        data_cfg.hub_config,
        hub_split,
        src_lang,
        tgt_lang,
        revision=data_cfg.get("hub_revision"),
        data_dir=data_cfg.get("hub_data_dir"),
    )


# -- encoded splits -------------------------------------------------------------------------
class EncodedSplit:
    """Subword ids of one split (no BOS/EOS) in an Arrow table with int32 list columns
    ``src_ids`` and ``tgt_ids``, memory-mapped when it comes from the cache
    (``transformer/corpus_cache.py``). Rows are read by index as numpy views of the Arrow
    buffers, so millions of examples cost no Python objects. Evaluation splits also carry
    their text (``src_text``/``tgt_text``); training splits have None there.
    """

    def __init__(
        self,
        table,
        src_text: list[str] | None = None,
        tgt_text: list[str] | None = None,
        lengths: tuple[np.ndarray, np.ndarray] | None = None,
        pages=None,
    ):
        """``lengths``: (source, target) lengths per row when known (the cache stores them),
        else read from the table's list offsets. ``pages``: the ``MappedPages`` of the files
        the table maps, asked before each read whether to release them (None: in memory)."""
        import pyarrow.compute as pc

        if [len(c) for c in table["src_ids"].chunks] != [len(c) for c in table["tgt_ids"].chunks]:
            table = table.combine_chunks()  # rare: give both columns one chunk layout
        self.table, self.src_text, self.tgt_text, self.pages = table, src_text, tgt_text, pages
        if lengths is None:
            lengths = [pc.list_value_length(table[c]).to_numpy() for c in ("src_ids", "tgt_ids")]
        self.src_lens, self.tgt_lens = (np.asarray(x, dtype=np.int64) for x in lengths)
        if len(self.src_lens) != len(table) or len(self.tgt_lens) != len(table):
            raise DataError(f"lengths for {len(self.src_lens)} rows, table has {len(table)}")
        # Per Arrow chunk: its first row, and offsets and values as zero-copy numpy views.
        sizes = [len(c) for c in table["src_ids"].chunks]
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._cols = {
            name: [(c.offsets.to_numpy(), c.values.to_numpy()) for c in table[name].chunks]
            for name in ("src_ids", "tgt_ids")
        }

    @classmethod
    def from_lists(cls, src, tgt, src_text=None, tgt_text=None) -> EncodedSplit:
        """An in-memory split from sequences of id arrays (tests, small data)."""
        import pyarrow as pa

        ids = pa.list_(pa.int32())
        table = pa.table(
            {
                "src_ids": pa.array([np.asarray(x, np.int32) for x in src], type=ids),
                "tgt_ids": pa.array([np.asarray(x, np.int32) for x in tgt], type=ids),
            }
        )
        return cls(table, src_text, tgt_text)

    def __len__(self) -> int:
        return len(self.src_lens)

    def rows(self, idx: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(source ids, target ids) of examples ``idx``: int32 views, no copies."""
        return self._rows(*self._locate(idx))

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(idx as int64, the Arrow chunk of each example), before a read: what earlier
        batches left mapped is dropped first, if over budget."""
        if self.pages is not None:
            self.pages.maybe_release()
        idx = np.asarray(idx, dtype=np.int64)
        return idx, np.searchsorted(self._starts, idx, side="right") - 1

    def _rows(self, idx: np.ndarray, chunk: np.ndarray):
        """``rows(idx)``, the Arrow chunk of each example given."""
        local = idx - self._starts[chunk]
        out = []
        for name in ("src_ids", "tgt_ids"):
            cols = self._cols[name]
            rows = []
            for c, i in zip(chunk.tolist(), local.tolist()):
                offsets, values = cols[c]
                rows.append(values[offsets[i] : offsets[i + 1]])
            out.append(rows)
        return out[0], out[1]

    def packed_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source ids, source lengths, target ids, target lengths) of examples ``idx``, each
        side's ids concatenated in the order of ``idx``. Where the examples share Arrow
        chunks (Multi30k's cache has 29 of 1,000 rows), numpy gathers them with one indexing
        per chunk; where most are in chunks of their own (a 5M-pair corpus has 5,000), one
        slice per example is less work. Only the offsets of these examples are read: reading
        every chunk's would map pages of the whole file into the process (``MappedPages``
        in corpus_cache)."""
        idx, chunk = self._locate(idx)
        lens = self.src_lens[idx], self.tgt_lens[idx]
        # The examples in chunk order, so that each chunk's rows and ids are one run each.
        by_chunk = np.argsort(chunk, kind="stable")
        in_order = chunk[by_chunk]
        row_cuts = np.append(np.flatnonzero(np.diff(in_order, prepend=-1)), len(idx))
        if PER_CHUNK_AT_LEAST * (len(row_cuts) - 1) > len(idx):
            src, tgt = self._rows(idx, chunk)
            empty = np.empty(0, dtype=np.int32)
            return np.concatenate([empty, *src]), lens[0], np.concatenate([empty, *tgt]), lens[1]
        present = in_order[row_cuts[:-1]].tolist()
        local = (idx - self._starts[chunk])[by_chunk]
        out = []
        for name, side_lens in zip(("src_ids", "tgt_ids"), lens):
            cols, n = self._cols[name], side_lens[by_chunk]
            starts = np.empty(len(idx), dtype=np.int64)  # of each row's ids in its chunk
            for k, c in enumerate(present):
                rows = slice(row_cuts[k], row_cuts[k + 1])
                starts[rows] = cols[c][0][local[rows]]
            at = ranges(starts, n)
            cuts = np.concatenate([[0], np.cumsum(n)])[row_cuts]  # each chunk's run of ids
            ids = np.empty(int(cuts[-1]), dtype=np.int32)
            for k, c in enumerate(present):
                run = slice(cuts[k], cuts[k + 1])
                ids[run] = cols[c][1][at[run]]
            packed = np.empty_like(ids)  # back in the order of idx
            packed[ranges((np.cumsum(side_lens) - side_lens)[by_chunk], n)] = ids
            out += [packed, side_lens]
        return out[0], out[1], out[2], out[3]


# Examples per Arrow chunk of a batch from which packed_rows gathers per chunk, not per example
PER_CHUNK_AT_LEAST = 2


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges ``starts[i] .. starts[i] + lengths[i]`` (end excluded), concatenated."""
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift


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
    # Sorted lengths never shrink, so a batch starting at ``start`` holding j+1 examples needs
    # sorted[start + j] * (j + 1) tokens, and no more than max_tokens // sorted[start] + 1
    # examples are ever candidates: each cut looks at that window only (numpy, no per-example
    # Python), so planning millions of examples takes a fraction of a second.
    sorted_lengths = lengths[order]
    batches, start, n = [], 0, len(order)
    while start < n:
        window = sorted_lengths[start : start + max_tokens // max(1, sorted_lengths[start]) + 1]
        over = np.flatnonzero(window * np.arange(1, len(window) + 1) > max_tokens)
        size = max(1, over[0]) if len(over) else len(window)  # one example even if too long
        batches.append(order[start : start + size])
        start += size
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(split: EncodedSplit, idx: np.ndarray, pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """Pad examples ``idx`` into a Batch: src + EOS, BOS + tgt, tgt + EOS, with boolean masks
    over the packed ids (``packed_rows``), not one example at a time: on this project's CPU
    a 4k-token Multi30k batch takes 0.45 ms against 0.73, a 25k-token one 1.36 ms against
    4.51 (results/bench/collate_time_cpu.md), time that a GPU step bound by its host waits
    for."""
    src_ids, src_lens, tgt_ids, tgt_lens = split.packed_rows(idx)
    B, S, T = len(idx), int(src_lens.max()) + 1, int(tgt_lens.max()) + 1
    rows = np.arange(B)
    src = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), pad_id, dtype=np.int64)
    # A boolean mask takes the ids row by row, in the order they are packed in.
    src[np.arange(S) < src_lens[:, None]] = src_ids
    src[rows, src_lens] = eos_id
    tgt_in[:, 0] = bos_id
    tgt_in[:, 1:][np.arange(T - 1) < tgt_lens[:, None]] = tgt_ids
    tgt_out[np.arange(T) < tgt_lens[:, None]] = tgt_ids
    tgt_out[rows, tgt_lens] = eos_id
    src_t = torch.from_numpy(src)
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
        budget: str = "data.max_tokens",  # what an error calls max_tokens
    ):
        self.split, self.max_tokens, self.seed, self.shuffle = split, max_tokens, seed, shuffle
        self.pad_id, self.bos_id, self.eos_id = special_ids
        self.rank, self.world_size = rank, world_size
        self.lengths = np.maximum(split.src_lens, split.tgt_lens) + 1
        self._plan = None  # (epoch, batches) of the last epoch planned
        longest = int(self.lengths.max())
        if longest > max_tokens:
            raise DataError(
                f"{budget}={max_tokens} is smaller than the longest example ({longest} "
                f"tokens); raise it{' or lower data.max_len' * budget.startswith('data.')}"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches = plan_batches(self.lengths, self.max_tokens, rng)
        if self.world_size > 1:  # equal count per rank so collective ops stay in step
            n = len(batches) // self.world_size * self.world_size
            if n < len(batches):  # others each epoch: the plan is shuffled per epoch
                log.info(
                    "epoch %d: %d batches for %d ranks; the last %d of its shuffled order are "
                    "left out so that every rank takes %d",
                    epoch, len(batches), self.world_size, len(batches) - n, n // self.world_size,
                )  # fmt: skip
            batches = batches[self.rank : n : self.world_size]
        self._plan = (epoch, batches)  # the trainer asks again on resume and at epoch ends
        return batches

    def batch(self, idx: np.ndarray) -> Batch:
        return collate(self.split, idx, self.pad_id, self.bos_id, self.eos_id)

    def batch_shape(self, idx: np.ndarray) -> tuple[int, int, int]:
        """The (B, S, T) that ``batch(idx)`` pads to (EOS on the source, BOS/EOS on the
        target: one more than the longest of each), from the lengths alone."""
        split = self.split
        return len(idx), int(split.src_lens[idx].max()) + 1, int(split.tgt_lens[idx].max()) + 1

    def padding_fraction(self, batch: Batch) -> float:
        real = int(batch.src_mask.sum()) + int((batch.tgt_out != self.pad_id).sum())
        return 1.0 - real / (batch.src.numel() + batch.tgt_out.numel())
