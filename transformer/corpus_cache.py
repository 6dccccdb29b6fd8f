"""Arrow caches that keep start-up time and memory flat on corpora of millions of pairs.

Three steps, each cached under ``data.cache_dir`` and keyed so that a changed input or
setting makes a new entry instead of reusing a stale one:

  raw/      local text files streamed line by line into an Arrow file (memory-mapped), keyed
            by the files' path, size and mtime and the cache version; Hub datasets are
            already Arrow in HF's cache.
  (spm/)    the SentencePiece model, trained on a bounded random sample (``sample_sentences``).
  encoded/  subword ids from ``Dataset.map(batched=True, num_proc=data.num_proc)``, keyed by
            the corpus fingerprint, direction, split, filters and both tokenizers' sha256,
            written with ``save_to_disk`` and opened with ``load_from_disk`` (memory-mapped),
            plus ``lengths.npy``: both sides' lengths, so that a warm start reads 8 bytes per
            pair instead of paging in the Arrow list offsets, which sit between the token ids
            (read-ahead would bring most of the ids into memory with them).

A warm start reads no corpus text: it stats the files, finds the tokenizer and the encoded
splits by key and maps them. ``EncodedSplit`` (data.py) reads rows straight from the map, and
``MappedPages`` keeps the pages it touches from piling up in the process's resident set.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .data import (
    DataError,
    EncodedSplit,
    check_langs,
    file_stamp,
    find_file,
    iter_lines,
    load_split,
    missing_directory,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the cached layout or the encoding changes
RECORD_ROWS = 100_000  # rows per Arrow record batch of raw text


def raw_stamp(paths) -> str:
    """``data.file_stamp`` of the files and the cache version: the raw text cache is keyed by
    it alone, and the text read from the same files changes with the reading (its line
    repairs) as much as with the files."""
    return file_stamp(paths, salt=f"v{CACHE_VERSION}|")


def stream_to_arrow(src_path: Path, tgt_path: Path, out: Path) -> None:
    """Write two line-aligned text files as an Arrow stream file (columns src, tgt), reading
    one record batch of lines at a time; line counts must agree."""
    import pyarrow as pa

    schema = pa.schema([("src", pa.string()), ("tgt", pa.string())])
    from .tokenizer import private_name

    tmp = private_name(out)
    src_it, tgt_it = iter_lines(src_path), iter_lines(tgt_path)
    n_src = n_tgt = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            while True:
                src = [s for _, s in zip(range(RECORD_ROWS), src_it)]
                tgt = [t for _, t in zip(range(len(src) or RECORD_ROWS), tgt_it)]
                n_src, n_tgt = n_src + len(src), n_tgt + len(tgt)
                if len(src) != len(tgt) or not src:
                    break
                writer.write_batch(pa.record_batch([src, tgt], schema=schema))
        n_src += sum(1 for _ in src_it)  # drain both, so counts are whole and warnings logged
        n_tgt += sum(1 for _ in tgt_it)
        if n_src != n_tgt:
            raise DataError(
                f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}"
            )
    except BaseException:  # an empty file, a count mismatch, a kill: leave nothing behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def open_split(d, split: str, cache_dir: Path):
    """(fingerprint, loader) of ``split``: loader() returns a disk-backed Dataset(src, tgt).
    Local files are fingerprinted without reading them, so a warm cache never reads them."""
    if not d.data_dir:
        ds = load_split(d, split)
        return ds._fingerprint, lambda: ds
    check_langs(d)
    directory = Path(d.data_dir) / d.name
    if not directory.is_dir():
        raise missing_directory(directory, split)
    paths = find_file(directory, split, d.src_lang), find_file(directory, split, d.tgt_lang)
    fingerprint = raw_stamp(paths)

    def load():
        from datasets import Dataset

        out = cache_dir / "raw" / f"{fingerprint}.arrow"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            stream_to_arrow(*paths, out)
        try:
            return Dataset.from_file(str(out))
        except (OSError, ValueError) as e:  # pyarrow's errors are one or the other
            raise damaged_cache(out, e) from e

    return fingerprint, load


def damaged_cache(path: Path, err: Exception) -> DataError:
    """A cache entry that is there but cannot be read (a disk fault, a file cut or removed by
    hand; entries are published whole, so no run leaves one half-written)."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [repr(err)])[0]
    return DataError(
        f"{path}: damaged cache ({reason}); delete it and run again: it is rebuilt from the corpus"
    )


def publish(built: Path, final: Path) -> None:
    """Move the finished cache folder ``built`` to ``final`` in one rename, so a half-written
    cache is never found. When another process sharing the cache (runs started together)
    published the same encoding first, its folder is kept as it is (it may be in use and holds
    the same data); only a stale folder without ``counts.json`` is replaced."""
    try:
        os.replace(built, final)  # fails on a non-empty folder: never removes one in use
    except OSError:
        if (final / "counts.json").is_file():
            return
        shutil.rmtree(final, ignore_errors=True)
        os.replace(built, final)


def sample_sentences(ds, columns: list[str], n: int, seed: int) -> list[str]:
    """At most ``n`` sentences of ``columns`` (one pool), a uniform sample reproducible from
    ``seed``; all of them, column after column, when the pool is no larger than ``n``."""
    total = len(ds) * len(columns)
    if total <= n:
        pick = np.arange(total)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    texts = []
    for c, column in enumerate(columns):
        rows = pick[(pick >= c * len(ds)) & (pick < (c + 1) * len(ds))] - c * len(ds)
        texts.extend(t for t in ds.select(rows)[column] if t is not None)  # a Hub null
    return texts


@functools.cache
def _libc_madvise():
    """libc's madvise(addr, length, advice), loaded once."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


class MappedPages:
    """The pages of the files in ``folder`` that this process has memory-mapped, and a way to
    take them out of its resident set when they exceed ``budget_mb``.

    Reading rows at random from a memory-mapped Arrow file maps every page touched into the
    process, and the kernel maps up to 64 KB around each fault, so within a few hundred
    batches the whole encoded corpus is resident (1.2 GB at 5M pairs) and counts in RSS,
    although it is page cache that the kernel could drop. ``maybe_release()`` watches the
    process's file-backed resident memory (``/proc/self/statm``, a few microseconds) and,
    once it has grown by more than the budget, unmaps the pages of these files from the
    process (``madvise(MADV_DONTNEED)``): the data stays in the page cache and a later read
    maps it again, from memory. The mappings are looked up in ``/proc/self/maps`` at each
    release, so only live, read-only mappings of these files are ever advised. Linux only;
    elsewhere, and with ``budget_mb=0``, nothing happens.
    """

    MADV_DONTNEED = 4  # Linux value

    def __init__(self, folder: Path, budget_mb: int):
        if not isinstance(budget_mb, int) or budget_mb < 0:
            raise ValueError(
                f"data.mapped_budget_mb must be a whole number of MB >= 0 (0 = never release), "
                f"got {budget_mb!r}"
            )
        self.prefix = str(Path(folder).resolve()) + os.sep
        self.budget_pages = budget_mb * 2**20 // os.sysconf("SC_PAGE_SIZE") if budget_mb else 0
        self.enabled = bool(self.budget_pages) and sys.platform.startswith("linux")
        self.releases, self._baseline = 0, 0
        if self.enabled:  # opening the table touched its record batch headers: start clean
            self.release()

    @staticmethod
    def _shared_pages() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2])  # resident file-backed (and shmem) pages

    def ranges(self) -> list[tuple[int, int]]:
        """(address, length) of this process's read-only mappings of files under the folder."""
        out = []
        with open("/proc/self/maps") as f:
            lines = [line for line in f.read().splitlines() if self.prefix in line]
        for line in lines:  # address perms offset dev inode path
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(self.prefix) and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end - start))
        return out

    def release(self) -> None:
        madvise = _libc_madvise()
        for start, length in self.ranges():
            if madvise(start, length, self.MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"madvise on the mapped cache {self.prefix}: {os.strerror(err)}")
        self.releases += 1
        self._baseline = self._shared_pages()

    def maybe_release(self) -> None:
        if self.enabled and self._shared_pages() - self._baseline > self.budget_pages:
            self.release()


# -- encoding ---------------------------------------------------------------------------------
_PROCESSORS: dict = {}


def _processor(path: str):
    """A SentencePieceProcessor per model file and process (map workers load their own)."""
    if path not in _PROCESSORS:
        import sentencepiece as spm

        _PROCESSORS[path] = spm.SentencePieceProcessor(model_file=path)
    return _PROCESSORS[path]


def encode_batch(
    batch, src_model: str, tgt_model: str, max_len: int, eval_split: bool, num_threads=None
):
    """Dataset.map function: stripped text -> ids. Evaluation splits keep their text, and
    their ids are truncated to ``max_len`` (``src_long`` and ``tgt_long`` flag the ones that
    were): the sources as translation will, the targets for the validation loss (BLEU
    scores the full text).
    ``num_threads``: SentencePiece's own threads (1 in map workers: the workers are the
    parallelism, and more threads than cores only thrash). A null in a Hub dataset is an
    empty side (a training pair with one is dropped and counted, as an empty line is)."""
    src_text = ["" if s is None else s.strip() for s in batch["src"]]
    tgt_text = ["" if t is None else t.strip() for t in batch["tgt"]]
    encode = dict(out_type=int, num_threads=num_threads)
    src_ids = _processor(src_model).encode(src_text, **encode)
    out = {"src_ids": src_ids, "tgt_ids": _processor(tgt_model).encode(tgt_text, **encode)}
    if eval_split:
        for side in ("src", "tgt"):
            ids = out[f"{side}_ids"]
            out[f"{side}_long"] = [len(x) > max_len for x in ids]
            out[f"{side}_ids"] = [x[:max_len] for x in ids]
        out["src_text"], out["tgt_text"] = src_text, tgt_text
    return out


def first_line(mask: np.ndarray) -> int | None:
    """The 1-based line (row of the split) of the first True in ``mask``, None if none."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) + 1 if len(hits) else None


def dropped_pairs(src: np.ndarray, tgt: np.ndarray, max_len: int) -> tuple[dict, np.ndarray]:
    """(counts, keep) of a training split's pairs: those with an empty side or a side longer
    than ``max_len`` are dropped; counts name how many of each and the first line of each."""
    empty = (src == 0) | (tgt == 0)
    long = ~empty & ((src > max_len) | (tgt > max_len))
    keep = ~(empty | long)
    counts = {"pairs": int(keep.sum()), "dropped": int((~keep).sum()), "empty": int(empty.sum())}
    counts.update(first_empty=first_line(empty), first_long=first_line(long))
    return counts, keep


def describe_drops(counts: dict, max_len: int) -> str:
    """What was dropped, as in "N with an empty side, first at line i; M longer than
    data.max_len=L tokens, first at line j" (caches written before the first lines were
    counted have none to name)."""
    parts = []
    for n, what, first in (
        (counts["empty"], "with an empty side", counts.get("first_empty")),
        (counts["dropped"] - counts["empty"], f"longer than data.max_len={max_len} tokens",
         counts.get("first_long")),
    ):  # fmt: skip
        parts.append(f"{n} {what}" + (f", first at line {first}" if first else ""))
    return "; ".join(parts)


def log_counts(name: str, counts: dict, max_len: int, lengths=None) -> None:
    """Log what encoding dropped (training) or cut (evaluation): a warning when it changed
    any pair. ``lengths``: an evaluation split's (source, target) lengths, whose empty lines
    (kept, so that hypotheses stay aligned) are reported too."""
    if "dropped" in counts:
        level = logging.WARNING if counts["dropped"] else logging.INFO
        log.log(
            level,
            "%s: %d pairs, dropped %d (%s)",
            name,
            counts["pairs"],
            counts["dropped"],
            describe_drops(counts, max_len),
        )
        return
    for key, what in (("truncated", "source"), ("tgt_truncated", "target")):
        if counts.get(key):
            log.warning(
                "%s: %d %s sentence(s) longer than %d tokens truncated%s",
                name,
                counts[key],
                what,
                max_len,
                " for the validation loss (BLEU scores the whole text)" if what == "target" else "",
            )
    if lengths is None:
        return
    for side_lens, what in zip(lengths, ("source", "reference")):
        empty = np.asarray(side_lens) == 0
        if empty.any() and not (what == "reference" and empty.all()):  # that one: below
            log.warning(
                "%s: %d of %d %s line(s) empty (first: line %d), kept so that hypotheses "
                "stay line-aligned with the references",
                name,
                int(empty.sum()),
                len(empty),
                what,
                first_line(empty),
            )


def write_encoding(
    ds, src_tok, tgt_tok, max_len: int, filter_long: bool, name: str, final: Path, key: str,
    num_proc: int,
) -> None:  # fmt: skip
    """Encode split ``name`` (the text dataset ``ds``) into the cache folder ``final``
    (``key``: its cache key, which the dataset's fingerprint takes too): its
    Arrow ids (and, for an evaluation split, its text), ``lengths.npy`` and
    ``counts.json``, written in a folder of this process's own and published whole
    (``encode_split``)."""
    from datasets import Features, List, Value

    from .tokenizer import private_name

    ids = List(Value("int32"))
    features = {"src_ids": ids, "tgt_ids": ids}
    if not filter_long:
        flag, text = Value("bool"), Value("string")
        features.update(src_long=flag, tgt_long=flag, src_text=text, tgt_text=text)
    work = private_name(final.parent / f"tmp-{key}", "run")
    work.mkdir(parents=True)  # this process's alone: a concurrent run works beside it
    try:
        workers = max(1, min(num_proc, len(ds) // 50_000))  # small splits: no workers
        ds = ds.map(
            encode_batch,
            batched=True,
            num_proc=workers if workers > 1 else None,  # datasets forks a pool even for 1
            remove_columns=ds.column_names,
            features=Features(features),
            fn_kwargs=dict(
                src_model=str(src_tok.path),
                tgt_model=str(tgt_tok.path),
                max_len=max_len,
                eval_split=not filter_long,
                num_threads=1 if workers > 1 else None,
            ),
            cache_file_name=str(work / "map.arrow"),
            new_fingerprint=key,  # our key; skips hashing the function
            desc=f"encoding {name}",
        )
        counts = {"pairs": len(ds)}
        mapped = EncodedSplit(ds.data.table)  # the map's output: no row selection yet
        src, tgt = mapped.src_lens, mapped.tgt_lens
        if filter_long:
            counts, keep = dropped_pairs(src, tgt, max_len)
            if counts["pairs"] == 0:
                raise DataError(
                    f"{name}: no sentence pairs left: all {counts['dropped']} dropped, "
                    f"{describe_drops(counts, max_len)}"
                )
            if counts["dropped"]:
                ds = ds.select(np.flatnonzero(keep))
                src, tgt = src[keep], tgt[keep]
        else:
            for count, column in (("truncated", "src_long"), ("tgt_truncated", "tgt_long")):
                counts[count] = int(np.asarray(ds.data.table[column]).sum())
            ds = ds.remove_columns(["src_long", "tgt_long"])
        ds.save_to_disk(str(work / "saved"))
        np.save(work / "saved" / "lengths.npy", np.stack([src, tgt]).astype(np.int32))
        (work / "saved" / "counts.json").write_text(json.dumps(counts))
        del ds, mapped
        publish(work / "saved", final)
        shutil.rmtree(work, ignore_errors=True)
    except BaseException:  # an error or a kill mid-way: leave no partial files behind
        shutil.rmtree(work, ignore_errors=True)
        raise


def encode_split(
    fingerprint: str,
    load,
    src_tok,
    tgt_tok,
    max_len: int,
    filter_long: bool,
    name: str,
    cache_dir: Path,
    num_proc: int = 1,
    mapped_budget_mb: int = 256,
) -> EncodedSplit:
    """Tokenize a split, or map its cached encoding. Training splits drop empty and overlong
    pairs (``filter_long``); evaluation splits keep every line and truncate overlong ids,
    so hypotheses stay line-aligned with references. Counts are logged either way.
    ``mapped_budget_mb``: how much of the mapped cache a training split keeps resident
    before its pages are released (``MappedPages``; 0 = never)."""
    from datasets import load_from_disk

    from .tokenizer import file_sha256

    key = "|".join(
        [
            f"v{CACHE_VERSION}",
            fingerprint,
            name,
            f"filter={filter_long}",
            f"max_len={max_len}",
            file_sha256(src_tok.path),
            file_sha256(tgt_tok.path),
        ]
    )
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    final = cache_dir / "encoded" / f"{name.replace('/', '.')}.{key}"
    if not (final / "counts.json").is_file():
        write_encoding(load(), src_tok, tgt_tok, max_len, filter_long, name, final, key, num_proc)
    else:
        log.info("%s: loaded the cached encoding %s (memory-mapped)", name, final)
    try:
        counts = json.loads((final / "counts.json").read_text())
        ds = load_from_disk(str(final))
        lengths = tuple(np.load(final / "lengths.npy"))
    except (OSError, ValueError) as e:  # pyarrow's and json's errors are one or the other
        raise damaged_cache(final, e) from e
    log_counts(name, counts, max_len, None if filter_long else lengths)
    if filter_long:
        return EncodedSplit(
            ds.data.table, lengths=lengths, pages=MappedPages(final, mapped_budget_mb)
        )
    refs = list(ds["tgt_text"])
    if not any(refs):  # e.g. a test set released without its references
        log.warning("%s: every reference line is empty: its BLEU and chrF will be 0", name)
    return EncodedSplit(ds.data.table, list(ds["src_text"]), refs, lengths)
