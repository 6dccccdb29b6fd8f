"""The Arrow caches of corpus_cache.py: same ids and batches as plain encoding, a warm
second start, a bounded tokenizer sample, and the Hub configs on a local dataset."""

import gzip
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from transformer import corpus_cache
from transformer.corpus_cache import (
    MappedPages,
    encode_split,
    publish,
    raw_stamp,
    sample_sentences,
)
from transformer.data import EncodedSplit, TokenBatcher, file_stamp, read_lines
from transformer.run_data import prepare_data
from transformer.tokenizer import train_or_load


def plain_encoding(corpus_root, tok, max_len):
    """Training ids as the in-memory pipeline made them: strip, encode, drop empty/long."""
    src = [s.strip() for s in read_lines(corpus_root / "multi30k" / "train.de")]
    tgt = [t.strip() for t in read_lines(corpus_root / "multi30k" / "train.en")]
    pairs = zip(tok.encode(src), tok.encode(tgt))
    return [(s, t) for s, t in pairs if 0 < len(s) <= max_len and 0 < len(t) <= max_len]


def test_cached_split_matches_plain_encoding_and_second_start_is_a_hit(
    compose, small_overrides, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    cfg = compose([*small_overrides, "data.max_len=20"])
    splits, tok, _, _ = prepare_data(cfg, tmp_path / "run1")
    assert "loaded the cached encoding" not in caplog.text
    train = splits["train"]
    expected = plain_encoding(Path(cfg.data.data_dir), tok, 20)
    src, tgt = train.rows(np.arange(len(train)))
    assert [(s.tolist(), t.tolist()) for s, t in zip(src, tgt)] == expected
    assert train.src_text is None and len(splits["valid"].src_text) == 40
    dropped = 300 - len(expected)
    assert f"multi30k/train: {len(expected)} pairs, dropped {dropped}" in caplog.text
    specials = (tok.pad_id, tok.bos_id, tok.eos_id)
    before = TokenBatcher(train, 512, 1, specials)
    lengths = [max(len(s), len(t)) + 1 for s, t in expected]
    assert before.lengths.tolist() == lengths

    caplog.clear()
    again, tok2, _, _ = prepare_data(cfg, tmp_path / "run2")
    assert tok2.path == tok.path
    assert "multi30k/train: loaded the cached encoding" in caplog.text
    assert f"multi30k/train: {len(expected)} pairs, dropped {dropped}" in caplog.text
    after = TokenBatcher(again["train"], 512, 1, specials)
    for a, b in zip(before.epoch_batches(3), after.epoch_batches(3), strict=True):
        assert (a == b).all()
        x, y = before.batch(a), after.batch(b)
        assert (x.src == y.src).all() and (x.tgt_out == y.tgt_out).all()
    assert again["valid"].tgt_text == splits["valid"].tgt_text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")
def test_mapped_pages_stay_within_budget_and_rows_read_back_intact(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    ids = [rng.integers(4, 30_000, rng.integers(1, 100), dtype=np.int32) for _ in range(100_000)]
    table = pa.table({"src_ids": pa.array(ids, pa.list_(pa.int32()))})
    table = table.append_column("tgt_ids", table["src_ids"])  # ~40 MB of ids in all
    (tmp_path / "cache").mkdir()
    with pa.OSFile(str(tmp_path / "cache" / "split.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1000)

    def read_all(budget_mb: int) -> tuple[int, int]:
        """(most file-backed resident MB added, releases) reading random batches of rows."""
        source = pa.memory_map(str(tmp_path / "cache" / "split.arrow"))
        mapped = pa.ipc.open_file(source).read_all()  # zero-copy views of the map
        pages = MappedPages(tmp_path / "cache", budget_mb)
        assert len(pages.ranges()) == 1  # that file, and nothing else of the process
        split = EncodedSplit(mapped, pages=pages)
        pages.release()  # opening touched the record batch headers: start from none resident
        before, most, releases = MappedPages._shared_pages(), 0, pages.releases
        for batch in rng.integers(0, len(ids), (600, 16)):
            src, tgt = split.rows(batch)  # reading the views maps their pages
            expected = np.concatenate([ids[i] for i in batch])
            assert (np.concatenate(src) == expected).all()
            assert (np.concatenate(tgt) == expected).all()
            most = max(most, MappedPages._shared_pages())
        grown = (most - before) * os.sysconf("SC_PAGE_SIZE") // 2**20
        return grown, pages.releases - releases

    grown, releases = read_all(budget_mb=0)  # no budget: never released, and most of
    assert grown >= 20 and releases == 0  # the file is resident (tuples compared >= only grown)
    grown, releases = read_all(budget_mb=4)  # the budget and one batch (16 rows x 3 faults
    assert grown <= 10 and releases >= 10  # x 64 KB mapped around each: 3 MB), with a margin
    assert MappedPages(tmp_path / "elsewhere", 1).ranges() == []
    with pytest.raises(ValueError, match="data.mapped_budget_mb"):
        MappedPages(tmp_path / "cache", -1)


def test_tokenizer_sample_is_bounded_and_reproducible(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict(
        {"src": [f"s{i}" for i in range(500)], "tgt": [f"t{i}" for i in range(500)]}
    )
    a = sample_sentences(ds, ["src", "tgt"], 100, seed=1)
    assert len(a) == 100 and a == sample_sentences(ds, ["src", "tgt"], 100, seed=1)
    assert a != sample_sentences(ds, ["src", "tgt"], 100, seed=2)
    assert any(t.startswith("s") for t in a) and any(t.startswith("t") for t in a)
    everything = sample_sentences(ds, ["src", "tgt"], 5000, seed=1)
    assert everything == list(ds["src"]) + list(ds["tgt"])  # small corpora: all, in order
    calls = []

    def texts():
        calls.append(1)
        return [f"ein satz nummer {i} über hunde und katzen" for i in range(200)]

    first = train_or_load(texts, tmp_path, vocab_size=60, key="corpus-a")
    second = train_or_load(texts, tmp_path, vocab_size=60, key="corpus-a")
    assert second.path == first.path and calls == [1]  # a hit never reads the corpus


@pytest.mark.parametrize("config", ["wmt14", "iwslt2017"])
def test_hub_configs_on_a_local_dataset_of_the_hub_schema(config, compose, tmp_path, caplog):
    """data=wmt14 / data=iwslt2017 with hub_name pointed at a local parquet dataset laid out
    like the Hub's (a `translation` column; train/validation/test), through prepare_data."""
    from datasets import Dataset

    caplog.set_level(logging.INFO)
    hub = tmp_path / "hub"
    hub.mkdir()
    words = ["hund", "katze", "haus", "baum", "auto", "ball"]
    en = {"hund": "dog", "katze": "cat", "haus": "house", "baum": "tree", "auto": "car"}
    en["ball"] = "ball"
    for split, n in (("train", 120), ("validation", 10), ("test", 12)):
        rows = []
        for i in range(n):
            de = [words[(i + j) % 6] for j in range(1 + i % 5)]
            rows.append({"de": "der " + " ".join(de), "en": "the " + " ".join(en[w] for w in de)})
        rows[5]["en" if split == "train" else "de"] = None  # a null: an empty side
        Dataset.from_dict({"translation": rows}).to_parquet(str(hub / f"{split}.parquet"))
    cfg = compose(
        [
            f"data={config}",
            f"data.hub_name={hub}",
            "data.hub_config=null",
            "data.hub_revision=null",
            "data.hub_data_dir=null",
            "data.vocab_size=40",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    splits, tok, _, _ = prepare_data(cfg, tmp_path / "run")
    assert set(splits) == {"train", "valid", "test"}
    assert len(splits["train"]) == 119 and len(splits["test"].src_text) == 12  # null dropped
    assert "" in (splits["test"].src_text[5], splits["test"].tgt_text[5])  # kept, aligned
    src_lang = cfg.data.src_lang
    assert splits["valid"].src_text[3].startswith("der " if src_lang == "de" else "the ")
    prepare_data(cfg, tmp_path / "run")
    assert f"{config}/train: loaded the cached encoding" in caplog.text


def test_raw_arrow_from_bad_files_is_an_error_that_leaves_no_file(tmp_path, monkeypatch):
    from transformer import corpus_cache
    from transformer.corpus_cache import stream_to_arrow
    from transformer.data import DataError

    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "a.en").write_text("one\n")
    (tmp_path / "empty.en").write_text("")
    out = tmp_path / "cache" / "raw.arrow"
    out.parent.mkdir()
    with pytest.raises(DataError, match="a.de has 2 lines, .*a.en has 1"):
        stream_to_arrow(tmp_path / "a.de", tmp_path / "a.en", out)
    with pytest.raises(DataError, match="empty.en is empty"):
        stream_to_arrow(tmp_path / "a.de", tmp_path / "empty.en", out)
    # counts past the record batch where the files part: both files read to the end
    monkeypatch.setattr(corpus_cache, "RECORD_ROWS", 2)
    (tmp_path / "long.en").write_text("".join(f"{i}\n" for i in range(9)))
    with pytest.raises(DataError, match="a.de has 2 lines, .*long.en has 9$"):
        stream_to_arrow(tmp_path / "a.de", tmp_path / "long.en", out)
    with pytest.raises(DataError, match="long.en has 9 lines, .*a.de has 2$"):
        stream_to_arrow(tmp_path / "long.en", tmp_path / "a.de", out)
    # a .gz that is not gzip, and one cut short: the file and the lines read are named
    (tmp_path / "plain.en.gz").write_bytes(b"one\ntwo\n")
    with pytest.raises(DataError, match=r"plain.en.gz: not a readable gzip file \(Not a gz"):
        stream_to_arrow(tmp_path / "a.de", tmp_path / "plain.en.gz", out)
    whole = gzip.compress("".join(f"line {i} of a file cut short\n" for i in range(4000)).encode())
    (tmp_path / "cut.en.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.en.gz: not a readable gzip file after line \d+ "):
        stream_to_arrow(tmp_path / "long.en", tmp_path / "cut.en.gz", out)
    assert list(out.parent.iterdir()) == []


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publishing_keeps_a_cache_another_run_published_first(tmp_path):
    """Runs started together encode the same split; the first finished folder stays (a run
    may be reading it), the later one is dropped; a stale folder without counts is replaced."""
    final = folder(tmp_path / "final", **{"counts.json": "{}", "data": "first"})
    publish(folder(tmp_path / "late", **{"counts.json": "{}", "data": "second"}), final)
    assert (final / "data").read_text() == "first"
    stale = folder(tmp_path / "stale", data="old")
    publish(folder(tmp_path / "new", **{"counts.json": "{}", "data": "new"}), stale)
    assert (stale / "data").read_text() == "new" and not (tmp_path / "new").exists()
    empty = folder(tmp_path / "absent") / "x"
    publish(folder(tmp_path / "fresh", **{"counts.json": "{}"}), empty)
    assert (empty / "counts.json").is_file()


def test_file_stamp_changes_with_the_file_at_the_same_size(tmp_path, monkeypatch):
    path = tmp_path / "train.de"
    path.write_text("ein hund\n", "utf-8")
    before = file_stamp([path])
    assert file_stamp([path]) == before
    path.write_text("ein hut!\n", "utf-8")  # same size, rewritten
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert path.stat().st_size == 9 and file_stamp([path]) != before
    # the raw text cache's key holds the cache version too: a new reading, a new entry
    raw = raw_stamp([path])
    assert raw != file_stamp([path])
    monkeypatch.setattr(corpus_cache, "CACHE_VERSION", corpus_cache.CACHE_VERSION + 1)
    assert raw_stamp([path]) != raw


PAIRS = {"src": ["ein hund läuft", "zwei kinder spielen im park"], "tgt": ["a dog runs", ""]}


@pytest.fixture()
def tokenizers(tmp_path):
    words = "ein hund läuft zwei kinder spielen im park a dog runs two children play the"
    text = [" ".join(words.split()[i:] + words.split()[:i]) for i in range(16)] * 5
    src = train_or_load(text, tmp_path / "spm", vocab_size=40, key="a")
    tgt = train_or_load(text, tmp_path / "spm", vocab_size=45, key="b")
    return src, tgt


def test_encoded_cache_is_keyed_by_every_setting(tokenizers, tmp_path):
    """The same settings map the cached encoding; any changed one encodes the split anew."""
    from datasets import Dataset

    loads = []

    def load():
        loads.append(1)
        return Dataset.from_dict(PAIRS)

    src_tok, tgt_tok = tokenizers
    base = dict(fingerprint="f1", load=load, src_tok=src_tok, tgt_tok=tgt_tok, max_len=20)
    base.update(filter_long=True, name="multi30k/train", cache_dir=tmp_path / "cache")
    encode_split(**base)
    encode_split(**base)
    assert len(loads) == 1
    changes = dict(fingerprint="f2", max_len=19, filter_long=False, name="multi30k/valid")
    changes.update(src_tok=tgt_tok, tgt_tok=src_tok)
    for key, value in changes.items():
        encode_split(**{**base, key: value})
        assert len(loads) == 2, key
        loads.clear()
        loads.append(1)


def test_evaluation_targets_are_truncated_for_the_validation_loss(tokenizers, tmp_path, caplog):
    """The teacher-forced validation loss gets at most max_len target ids (a Transformer has
    positions for no more); the text BLEU scores stays whole."""
    from datasets import Dataset

    src_tok, tgt_tok = tokenizers
    pairs = {"src": ["ein hund"], "tgt": ["a dog runs two children play"]}
    assert len(tgt_tok.encode(pairs["tgt"])[0]) > 2
    valid = encode_split(
        fingerprint="g",
        load=lambda: Dataset.from_dict(pairs),
        src_tok=src_tok,
        tgt_tok=tgt_tok,
        max_len=2,
        filter_long=False,
        name="v",
        cache_dir=tmp_path / "c",
    )
    assert valid.tgt_lens.tolist() == [2]
    assert valid.tgt_text == pairs["tgt"]
    assert (
        "v: 1 target sentence(s) longer than 2 tokens truncated for the validation" in caplog.text
    )


def test_an_evaluation_split_without_references_is_reported(tokenizers, tmp_path, caplog):
    """Its BLEU was 0 at every evaluation, without a word why."""
    from datasets import Dataset

    src_tok, tgt_tok = tokenizers
    args = dict(src_tok=src_tok, tgt_tok=tgt_tok, max_len=20, filter_long=False, name="v")
    for refs, warned in ((["", " "], True), (["", "a dog"], False)):
        caplog.clear()
        pairs = Dataset.from_dict({"src": ["ein", "hund"], "tgt": refs})
        encode_split(str(refs), lambda pairs=pairs: pairs, cache_dir=tmp_path / "c", **args)
        assert ("v: every reference line is empty" in caplog.text) == warned


def test_encoding_counts_and_truncation(tokenizers, tmp_path, caplog):
    """Training drops a pair with one empty side (and names the count); evaluation keeps every
    line, truncating sources to exactly max_len and warning only of those over it."""
    from datasets import Dataset

    src_tok, tgt_tok = tokenizers
    lengths = [len(ids) for ids in src_tok.encode(PAIRS["src"])]
    assert lengths[0] < lengths[1]
    caplog.set_level(logging.INFO)
    common = dict(fingerprint="f", src_tok=src_tok, tgt_tok=tgt_tok, cache_dir=tmp_path / "c")
    train = encode_split(
        load=lambda: Dataset.from_dict(PAIRS), max_len=50, filter_long=True, name="t", **common
    )
    assert len(train) == 1
    assert "t: 1 pairs, dropped 1 (1 with an empty side, first at line 2; 0 longer than" in (
        caplog.text
    )
    for max_len, truncated in [(lengths[1], 0), (lengths[1] - 1, 1)]:
        caplog.clear()
        valid = encode_split(
            load=lambda: Dataset.from_dict(PAIRS),
            max_len=max_len,
            filter_long=False,
            name="v",
            **common,
        )
        assert valid.src_lens.tolist() == [lengths[0], min(lengths[1], max_len)]
        assert valid.tgt_text == PAIRS["tgt"]  # the empty line is kept
        warned = f"v: 1 source sentence(s) longer than {max_len} tokens truncated"
        assert (warned in caplog.text) == bool(truncated)


def test_dropped_pairs_and_empty_evaluation_lines_are_warned_with_their_first_line(
    tokenizers, tmp_path, caplog
):
    """Pairs dropped from training were an INFO line without a line number (296 of 300 lost
    to data.max_len=12 read like a routine count), a split emptied by blank lines blamed
    data.max_len alone, and empty lines kept in an evaluation split were not reported."""
    from datasets import Dataset

    from transformer.data import DataError

    src_tok, tgt_tok = tokenizers
    pairs = {"src": ["ein hund", "", "zwei kinder spielen im park a dog", "ein", ""]}
    pairs["tgt"] = ["a dog", "a dog", "two", "", "the"]
    common = dict(src_tok=src_tok, tgt_tok=tgt_tok, max_len=3, cache_dir=tmp_path / "c")
    load = lambda: Dataset.from_dict(pairs)  # noqa: E731
    caplog.set_level(logging.INFO)
    for _run in range(2):  # built, then read from the cache: the same warning
        caplog.clear()
        assert len(encode_split("f", load, filter_long=True, name="t", **common)) == 1
        (record,) = [r for r in caplog.records if "pairs, dropped" in r.message]
        assert record.levelno == logging.WARNING
        assert record.message == (
            "t: 1 pairs, dropped 4 (3 with an empty side, first at line 2; 1 longer than "
            "data.max_len=3 tokens, first at line 3)"
        )
    caplog.clear()
    encode_split("f", load, filter_long=False, name="v", **common)
    said = "kept so that hypotheses stay line-aligned with the references"
    assert f"v: 2 of 5 source line(s) empty (first: line 2), {said}" in caplog.text
    assert f"v: 1 of 5 reference line(s) empty (first: line 4), {said}" in caplog.text
    blank = {"src": ["", " "], "tgt": ["a dog", "the"]}
    with pytest.raises(DataError, match="^t: no sentence pairs left: all 2 dropped, 2 with an "):
        encode_split("g", lambda: Dataset.from_dict(blank), filter_long=True, name="t", **common)


@pytest.mark.parametrize("damage", ["cut arrow", "no lengths", "bad counts"])
def test_a_damaged_cache_entry_names_itself_and_how_to_mend_it(tokenizers, tmp_path, damage):
    """A cut Arrow file gave pyarrow's "Expected to be able to read ... bytes" traceback,
    naming no file; a removed lengths.npy a bare "No such file"."""
    from datasets import Dataset

    from transformer.data import DataError

    src_tok, tgt_tok = tokenizers
    args = dict(fingerprint="f1", load=lambda: Dataset.from_dict(PAIRS), src_tok=src_tok)
    args.update(tgt_tok=tgt_tok, max_len=20, filter_long=True, name="multi30k/train")
    args.update(cache_dir=tmp_path / "cache")
    encode_split(**args)
    (entry,) = (tmp_path / "cache" / "encoded").iterdir()
    if damage == "cut arrow":
        (arrow,) = entry.glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[:200])
    elif damage == "no lengths":
        (entry / "lengths.npy").unlink()
    else:
        (entry / "counts.json").write_text("{")
    with pytest.raises(DataError, match=f"^{entry}: damaged cache .*; delete it and run again"):
        encode_split(**args)
    shutil.rmtree(entry)  # what the message says to do
    assert len(encode_split(**args)) == 1  # the pair with an empty target is dropped


def test_a_new_cache_version_reads_the_corpus_again(
    compose, small_overrides, tmp_path, monkeypatch
):
    """The raw text cache was keyed by the files' path, size and mtime only: a version
    bumped for a change in how lines are read (their repairs) rebuilt the encoded cache
    from the old raw text."""
    from transformer import corpus_cache

    cfg = compose([*small_overrides, f"data.cache_dir={tmp_path / 'cache'}"])
    prepare_data(cfg, tmp_path / "run1")
    before = sorted((tmp_path / "cache" / "raw").glob("*.arrow"))
    monkeypatch.setattr(corpus_cache, "CACHE_VERSION", corpus_cache.CACHE_VERSION + 1)
    prepare_data(cfg, tmp_path / "run2")
    after = sorted((tmp_path / "cache" / "raw").glob("*.arrow"))
    assert len(before) == 3 and len(after) == 6  # train, valid, test2016 read again


def test_the_raw_text_cache_follows_either_sides_file_and_the_direction(compose, tmp_path):
    """A corpus whose target file was replaced read the old target text from the cache
    when only the source file's stamp was in the key; the other direction reads the sides
    the other way round."""
    from transformer.corpus_cache import open_split

    corpus = folder(tmp_path / "data" / "multi30k", **{"train.de": "eins\nzwei\n"})
    (corpus / "train.en").write_text("one\ntwo\n")
    cfg = compose([f"data.data_dir={tmp_path / 'data'}", "run_dir=/tmp/unused"])
    cache = tmp_path / "cache"

    def read(data=cfg.data):
        ds = open_split(data, "train", cache)[1]()
        return list(ds["src"]), list(ds["tgt"])

    assert read() == (["eins", "zwei"], ["one", "two"])
    (corpus / "train.en").write_text("one\nthree\n")
    assert read() == (["eins", "zwei"], ["one", "three"])
    (corpus / "train.de").write_text("eins\ndreizehn\n")  # (sizes differ: mtimes may not)
    assert read() == (["eins", "dreizehn"], ["one", "three"])
    reverse = compose([f"data.data_dir={tmp_path / 'data'}", "data.src_lang=en",
                       "data.tgt_lang=de", "run_dir=/tmp/unused"]).data  # fmt: skip
    assert read(reverse) == (["one", "three"], ["eins", "dreizehn"])


def test_separate_vocabularies_are_trained_each_on_its_own_side(compose, small_overrides, tmp_path):
    """With data.joint_vocab=false the target tokenizer is trained on the target side: one
    cache key for both sides made it the source's tokenizer, copied as en.model."""
    cfg = compose([*small_overrides, "data.joint_vocab=false",
                   "model.share_src_tgt_embeddings=false"])  # fmt: skip
    _, src_tok, tgt_tok, info = prepare_data(cfg, tmp_path / "run")
    assert (info["src"], info["tgt"]) == ("tokenizer/de.model", "tokenizer/en.model")
    assert info["src_sha256"] != info["tgt_sha256"]
    lines = {lang: read_lines(Path(cfg.data.data_dir) / "multi30k" / f"train.{lang}")
             for lang in ("de", "en")}  # fmt: skip

    def pieces(tok, lang):
        return sum(map(len, tok.encode(lines[lang])))

    # each tokenizer cuts its own language into fewer pieces than the other one does
    assert pieces(src_tok, "de") < pieces(tgt_tok, "de")
    assert pieces(tgt_tok, "en") < pieces(src_tok, "en")


def test_only_a_resumed_run_keeps_the_tokenizer_in_its_folder(compose, small_overrides, tmp_path):
    """A fresh start takes the tokenizer of its own settings (trained, or the cache's) over
    one an earlier run left in the folder (of another data.vocab_size here); a resumed run
    keeps the one its checkpoints' ids mean."""
    cfg = compose(small_overrides)
    info = prepare_data(cfg, tmp_path / "run")[3]
    other = prepare_data(compose([*small_overrides, "data.vocab_size=200"]), tmp_path / "other")[3]
    assert other["src_sha256"] != info["src_sha256"]
    shutil.copyfile(tmp_path / "other" / other["src"], tmp_path / "run" / info["src"])
    assert prepare_data(cfg, tmp_path / "run", resuming=True)[3] == other
    assert prepare_data(cfg, tmp_path / "run")[3] == info
