"""Arrow caches that keep start-up time and memory flat on corpora of millions of pairs.

Three steps, each cached under ``data.cache_dir`` and keyed so that a changed input or
setting makes a new entry instead of reusing a stale one:

  raw/      local text files streamed line by line into an Arrow file (memory-mapped), keyed
            by the files' path, size and mtime; Hub datasets are already Arrow in HF's cache.
  (spm/)    the SentencePiece model, trained on a bounded random sample (``sample_sentences``).
  encoded/  subword ids from ``Dataset.map(batched=True, num_proc=data.num_proc)``, keyed by
            the corpus fingerprint, direction, split, filters and both tokenizers' sha256,
            written with ``save_to_disk`` and opened with ``load_from_disk`` (memory-mapped),
            plus ``lengths.npy``: both sides' lengths, so that a warm start reads 8 bytes per
            pair instead of paging in the Arrow list offsets, which sit between the token ids
            (read-ahead would bring most of the ids into memory with them).

A warm start reads no corpus text: it stats the files, finds the tokenizer and the encoded
splits by key and maps them. ``EncodedSplit`` (data.py) reads rows straight from the map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .data import DataError, EncodedSplit, check_langs, find_file, iter_lines, load_split

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the cached layout or the encoding changes
RECORD_ROWS = 100_000  # rows per Arrow record batch of raw text


def file_stamp(paths) -> str:
    """A fingerprint of files from path, size and mtime (no reading)."""
    stamp = "|".join(
        f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in map(Path, paths)
    )
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def stream_to_arrow(src_path: Path, tgt_path: Path, out: Path) -> None:
    """Write two line-aligned text files as an Arrow stream file (columns src, tgt), reading
    one record batch of lines at a time; line counts must agree."""
    import pyarrow as pa

    schema = pa.schema([("src", pa.string()), ("tgt", pa.string())])
    tmp = out.with_suffix(f".tmp{os.getpid()}")
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
        raise DataError(f"data directory not found: {directory} (set MT_DATA_DIR or data.data_dir)")
    paths = find_file(directory, split, d.src_lang), find_file(directory, split, d.tgt_lang)
    fingerprint = file_stamp(paths)

    def load():
        from datasets import Dataset

        out = cache_dir / "raw" / f"{fingerprint}.arrow"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            stream_to_arrow(*paths, out)
        return Dataset.from_file(str(out))

    return fingerprint, load


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
        texts.extend(ds.select(rows)[column])
    return texts


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
    their sources are truncated to ``max_len`` (``src_long`` flags the ones that were).
    ``num_threads``: SentencePiece's own threads (1 in map workers: the workers are the
    parallelism, and more threads than cores only thrash)."""
    src_text = [s.strip() for s in batch["src"]]
    tgt_text = [t.strip() for t in batch["tgt"]]
    encode = dict(out_type=int, num_threads=num_threads)
    src_ids = _processor(src_model).encode(src_text, **encode)
    out = {"src_ids": src_ids, "tgt_ids": _processor(tgt_model).encode(tgt_text, **encode)}
    if eval_split:
        out["src_long"] = [len(s) > max_len for s in src_ids]
        out["src_ids"] = [s[:max_len] for s in src_ids]
        out["src_text"], out["tgt_text"] = src_text, tgt_text
    return out


def log_counts(name: str, counts: dict, max_len: int) -> None:
    if "dropped" in counts:
        log.info(
            "%s: %d pairs, dropped %d (%d with an empty side, %d longer than "
            "data.max_len=%d tokens)",
            name,
            counts["pairs"],
            counts["dropped"],
            counts["empty"],
            counts["dropped"] - counts["empty"],
            max_len,
        )
    elif counts["truncated"]:
        log.warning(
            "%s: %d source sentence(s) longer than %d tokens truncated",
            name,
            counts["truncated"],
            max_len,
        )


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
) -> EncodedSplit:
    """Tokenize a split, or map its cached encoding. Training splits drop empty and overlong
    pairs (``filter_long``); evaluation splits keep every line and truncate overlong sources,
    so hypotheses stay line-aligned with references. Counts are logged either way."""
    from datasets import Features, List, Value, load_from_disk

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
        ds = load()
        ids = List(Value("int32"))
        features = {"src_ids": ids, "tgt_ids": ids}
        if not filter_long:
            features.update(src_long=Value("bool"), src_text=Value("string"))
            features["tgt_text"] = Value("string")
        work = cache_dir / "encoded" / f"tmp-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
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
                keep = (src > 0) & (src <= max_len) & (tgt > 0) & (tgt <= max_len)
                counts = {
                    "pairs": int(keep.sum()),
                    "dropped": int((~keep).sum()),
                    "empty": int(((src == 0) | (tgt == 0)).sum()),
                }
                if counts["pairs"] == 0:
                    raise DataError(
                        f"{name}: no sentence pairs left after filtering (data.max_len={max_len})"
                    )
                if counts["dropped"]:
                    ds = ds.select(np.flatnonzero(keep))
                    src, tgt = src[keep], tgt[keep]
            else:
                counts["truncated"] = int(np.asarray(ds.data.table["src_long"]).sum())
                ds = ds.remove_columns("src_long")
            ds.save_to_disk(str(work / "saved"))
            np.save(work / "saved" / "lengths.npy", np.stack([src, tgt]).astype(np.int32))
            (work / "saved" / "counts.json").write_text(json.dumps(counts))
            del ds, mapped
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work / "saved", final)  # atomic: a half-written cache is never found
            shutil.rmtree(work, ignore_errors=True)
        except BaseException:  # an error or a kill mid-way: leave no partial files behind
            shutil.rmtree(work, ignore_errors=True)
            raise
    else:
        log.info("%s: loaded the cached encoding %s (memory-mapped)", name, final)
    counts = json.loads((final / "counts.json").read_text())
    log_counts(name, counts, max_len)
    ds = load_from_disk(str(final))
    lengths = tuple(np.load(final / "lengths.npy"))
    if filter_long:
        return EncodedSplit(ds.data.table, lengths=lengths)
    return EncodedSplit(ds.data.table, list(ds["src_text"]), list(ds["tgt_text"]), lengths)
