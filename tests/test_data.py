import gzip
import logging
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from transformer.corpus_cache import open_split
from transformer.data import (
    DataError,
    EncodedSplit,
    TokenBatcher,
    collate,
    iter_lines,
    load_hub,
    load_local,
    load_split,
    plan_batches,
    read_lines,
)
from transformer.seq2seq import Batch


def write(path, lines, gz=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_local_plain_and_gzipped_files(tmp_path):
    write(tmp_path / "train.de", ["eins", "zwei"])
    write(tmp_path / "train.en.gz", ["one", "two"], gz=True)
    ds = load_local(tmp_path, "train", "de", "en")
    assert ds["src"] == ["eins", "zwei"] and ds["tgt"] == ["one", "two"]


def test_a_plain_file_beside_its_gz_is_read_with_a_warning(tmp_path, caplog):
    """Which one was read was said nowhere, and a stale copy would train unnoticed."""
    write(tmp_path / "train.de", ["eins"])
    write(tmp_path / "train.de.gz", ["alt", "veraltet"], gz=True)
    write(tmp_path / "train.en", ["one"])
    assert load_local(tmp_path, "train", "de", "en")["src"] == ["eins"]
    assert f"both {tmp_path}/train.de and train.de.gz exist: reading train.de" in caplog.text
    assert caplog.text.count("both") == 1  # not for train.en


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    write(tmp_path / "train.de", ["a", "b", "c"])
    write(tmp_path / "train.en", ["a", "b"])
    with pytest.raises(DataError) as e:
        load_local(tmp_path, "train", "de", "en")
    msg = str(e.value)
    assert "train.de has 3 lines" in msg and "train.en has 2" in msg


def test_missing_directory_and_language_are_clear_errors(tmp_path, compose):
    with pytest.raises(DataError, match="data directory not found: .*set MT_DATA_DIR or data"):
        load_local(tmp_path / "root" / "nope", "train", "de", "en")
    (tmp_path / "corpus_a").mkdir()
    (tmp_path / "corpus_b").mkdir()
    # the root is right and the corpus name wrong: it said "set MT_DATA_DIR or data.data_dir"
    hint = f"data.data_dir={tmp_path} holds no corpus 'nope' .data.name.; its folders: corpus_a, "
    with pytest.raises(DataError, match=f"data directory not found: .*{hint}corpus_b$"):
        load_local(tmp_path / "nope", "train", "de", "en")
    write(tmp_path / "train.de", ["a"])
    with pytest.raises(DataError, match=r"no file train.en\[.gz\].*languages found.*de"):
        load_local(tmp_path, "train", "de", "en")
    # the corpus's languages as it stated them were Multi30k's, and data.langs went unnamed
    cfg = compose([f"data.data_dir={tmp_path}", "data.src_lang=xx", "run_dir=/tmp/unused"])
    langs = r"data.src_lang='xx' is not among data.langs=\['en', 'de', 'fr', 'cs'\]"
    with pytest.raises(DataError, match=f"{langs}.*'data.langs=\\[xx,en\\]'"):
        load_split(cfg.data, "train")
    cfg = compose([f"data.data_dir={tmp_path}", "data.src_lang=en", "run_dir=/tmp/unused"])
    with pytest.raises(DataError, match="^data.src_lang and data.tgt_lang are both 'en'$"):
        load_split(cfg.data, "train")


def test_a_corpus_file_of_another_suffix_or_folder_is_named(tmp_path, compose):
    """train.de.xz was reported as "no file train.de[.gz] (languages found: de, en)", and a
    data.data_dir that is the corpus's own folder as "set MT_DATA_DIR or data.data_dir"."""
    write(tmp_path / "train.de.xz", ["not read"])
    write(tmp_path / "train.en", ["a"])
    with pytest.raises(DataError, match=r"no file train.de\[.gz\] in .*, only train.de.xz: "):
        load_local(tmp_path, "train", "de", "en")
    cfg = compose([f"data.data_dir={tmp_path}", "run_dir=/tmp/unused"])
    hint = f"{tmp_path} holds train.* itself: set data.data_dir={tmp_path.parent} data.name="
    for load in (load_split, lambda d, s: open_split(d, s, tmp_path / "cache")):
        with pytest.raises(DataError, match=f"not found: {tmp_path}/multi30k: .*{re.escape(hint)}"):
            load(cfg.data, "train")


def test_a_damaged_gzip_file_is_a_clear_error(tmp_path):
    (tmp_path / "train.de.gz").write_bytes(b"eins\nzwei\n")  # named .gz, not gzip
    with pytest.raises(DataError, match=r"train.de.gz: not a readable gzip file \(Not a gz"):
        read_lines(tmp_path / "train.de.gz")
    whole = gzip.compress(b"eins\nzwei\n" * 1000)
    (tmp_path / "train.de.gz").write_bytes(whole[:-10])  # cut short
    with pytest.raises(DataError, match="train.de.gz: not a readable gzip file .*ended"):
        read_lines(tmp_path / "train.de.gz")


@pytest.mark.parametrize(
    "name, data, said",
    [
        ("train.de", gzip.compress(b"eins\nzwei\n"), "is gzip-compressed: name it train.de.gz"),
        ("train.de", "eins\nzwei\n".encode("utf-16"), "is UTF-16 text (it starts with a UTF-16"),
        ("train.de.gz", gzip.compress("\ufeffeins\n".encode("utf-16-be")), "is UTF-16 text"),
    ],
    ids=["gzip", "utf-16", "utf-16-be.gz"],
)
def test_gzip_without_its_suffix_and_utf16_are_named(tmp_path, name, data, said):
    """Read as UTF-8 text, both made lines of U+FFFD and control characters, reported only
    as repairs or as the other side's line count."""
    (tmp_path / name).write_bytes(data)
    for read in (read_lines, lambda path: list(iter_lines(path))):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name} {said}")):
            read(tmp_path / name)


def test_invalid_utf8_is_replaced_not_dropped(tmp_path, caplog):
    (tmp_path / "x.de").write_bytes(b"gut\n\xff\xfe kaputt\nok\n")
    lines = read_lines(tmp_path / "x.de")
    assert len(lines) == 3 and lines[1].endswith("kaputt") and "\ufffd" in lines[1]
    assert "1 line(s) not valid UTF-8" in caplog.text and "(first: line 2)" in caplog.text


def test_a_last_line_without_its_newline_is_read_whole(tmp_path):
    """The cached reading (line by line) and the whole-file one give the same lines."""
    write(tmp_path / "a.de.gz", ["eins"], gz=True)
    (tmp_path / "a.de").write_bytes(b"eins\nzwei")
    with gzip.open(tmp_path / "a.de.gz", "ab") as f:
        f.write(b"zwei")
    for path in (tmp_path / "a.de", tmp_path / "a.de.gz"):
        assert read_lines(path) == list(iter_lines(path)) == ["eins", "zwei"], path


def test_hub_path_on_a_local_parquet_dataset(tmp_path):
    """The Hub code path (load_dataset by name) run on a local dataset of the same schema."""
    from datasets import Dataset

    d = tmp_path / "multi30k_hub"
    d.mkdir()
    Dataset.from_dict({"en": ["a dog", "a cat"], "de": ["ein hund", "eine katze"]}).to_parquet(
        str(d / "validation.parquet")
    )
    ds = load_hub(str(d), None, "validation", "de", "en")
    assert ds["src"] == ["ein hund", "eine katze"] and ds["tgt"] == ["a dog", "a cat"]
    t = tmp_path / "wmt_like"
    t.mkdir()
    Dataset.from_dict({"translation": [{"de": "hallo", "en": "hello"}]}).to_parquet(
        str(t / "train.parquet")
    )
    ds = load_hub(str(t), None, "train", "de", "en")
    assert ds["src"] == ["hallo"] and ds["tgt"] == ["hello"]
    with pytest.raises(DataError, match="no column 'fr'"):
        load_hub(str(d), None, "validation", "fr", "en")
    # through load_split, without data.hub_splits (optional: the split keeps its name)
    cfg = OmegaConf.create({"name": "x", "data_dir": None, "hub_name": str(t), "hub_config": None,
                            "src_lang": "de", "tgt_lang": "en", "langs": ["de", "en"]})  # fmt: skip
    assert load_split(cfg, "train")["src"] == ["hallo"]


def test_a_hub_dataset_out_of_reach_says_how_to_train_without_it(monkeypatch):
    """Offline (as the tests are), the error was datasets' "Couldn't reach 'wmt/wmt14' on the
    Hub (OfflineModeIsEnabled)" alone; with the network down, the same after ~25 s of
    retries, without a word of local files or of HF_HUB_OFFLINE."""
    import datasets

    local = "train on local files instead: data.data_dir=DIR reads DIR/<data.name>/"
    with pytest.raises(DataError) as e:
        load_hub("wmt/wmt14", "de-en", "train", "en", "de")
    assert "HF_HUB_OFFLINE is set and the dataset is not in the Hugging Face cache" in str(e.value)
    assert local in str(e.value)

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wmt/wmt14' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError, match=f"{local}.*HF_HUB_OFFLINE=1 fails at once"):
        load_hub("wmt/wmt14", "de-en", "train", "en", "de")


def fake_split(n=200, seed=0):
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, rng.integers(1, 30)).astype(np.int32) for _ in range(n)]
    tgt = [rng.integers(4, 50, rng.integers(1, 30)).astype(np.int32) for _ in range(n)]
    return EncodedSplit.from_lists(src, tgt)


def test_batches_respect_max_tokens_and_cover_every_example_once():
    split = fake_split()
    batcher = TokenBatcher(split, max_tokens=120, seed=1, special_ids=(0, 2, 3))
    plan = batcher.epoch_batches(0)
    seen = np.concatenate(plan)
    assert sorted(seen.tolist()) == list(range(len(split)))
    for idx in plan:
        b = batcher.batch(idx)
        assert b.src.numel() <= 120 and b.tgt_in.numel() <= 120
        assert (b.tgt_in[:, 0] == 2).all()
        assert batcher.batch_shape(idx) == (*b.src.shape, b.tgt_out.shape[1])


def padded_one_by_one(src, tgt, idx, pad, bos, eos):
    """Reference for collate: each example written into its rows in Python."""
    B, S, T = len(idx), max(len(src[i]) for i in idx) + 1, max(len(tgt[i]) for i in idx) + 1
    out = np.full((B, S), pad), np.full((B, T), pad), np.full((B, T), pad)
    for b, i in enumerate(idx):
        s, t = src[i].tolist(), tgt[i].tolist()
        out[0][b, : len(s) + 1] = [*s, eos]
        out[1][b, : len(t) + 1] = [bos, *t]
        out[2][b, : len(t) + 1] = [*t, eos]
    return out


def test_a_batch_is_its_examples_padded_across_arrow_chunks():
    """Examples from several chunks of the Arrow table, in any order, empty ones too."""
    import pyarrow as pa

    rng = np.random.default_rng(5)
    src = [rng.integers(4, 50, rng.integers(0, 20)).astype(np.int32) for _ in range(90)]
    tgt = [rng.integers(4, 50, rng.integers(0, 20)).astype(np.int32) for _ in range(90)]
    parts = [EncodedSplit.from_lists(src[a : a + 30], tgt[a : a + 30]).table for a in (0, 30, 60)]
    split = EncodedSplit(pa.concat_tables(parts))
    assert split.table["src_ids"].num_chunks == 3
    assert min(len(x) for x in src) == 0 and min(len(x) for x in tgt) == 0
    by_example = []  # which examples were read one slice each (packed_rows' other way)
    split._rows = lambda idx, chunk, read=split._rows: by_example.append(idx) or read(idx, chunk)
    for idx in [rng.permutation(90)[:37], np.array([61]), np.array([5, 5, 89])]:
        b = collate(split, idx, pad_id=0, bos_id=2, eos_id=3)
        want = padded_one_by_one(src, tgt, idx, pad=0, bos=2, eos=3)
        for got, expected in zip((b.src, b.tgt_in, b.tgt_out), want):
            assert got.dtype == torch.int64 and np.array_equal(got.numpy(), expected)
        assert torch.equal(b.src_mask, b.src != 0)
    assert [len(x) for x in by_example] == [1, 3]  # 37 examples in 3 chunks: per chunk


def test_batch_order_reproducible_per_epoch_and_reshuffled_between_epochs():
    batcher = TokenBatcher(fake_split(), max_tokens=120, seed=1, special_ids=(0, 2, 3))
    fresh = TokenBatcher(fake_split(), max_tokens=120, seed=1, special_ids=(0, 2, 3))
    e0, e1, e0_again = batcher.epoch_batches(0), batcher.epoch_batches(1), fresh.epoch_batches(0)
    assert len(e0) == len(e0_again)
    assert all((a == b).all() for a, b in zip(e0, e0_again))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(e0, e1))


def test_the_batch_plan_is_shuffled_from_the_seed():
    """The batches come in shuffled order (not shortest first, as cut), another seed gives
    another order, and ties in length are broken anew each epoch, so that an epoch's batches
    are not the same groups of examples as the last one's."""
    split = fake_split()

    def plan(seed, epoch):
        return TokenBatcher(split, 120, seed, (0, 2, 3)).epoch_batches(epoch)

    lengths = TokenBatcher(split, 120, 1, (0, 2, 3)).lengths
    longest = [int(lengths[b].max()) for b in plan(1, 0)]
    assert longest != sorted(longest)
    assert [b.tolist() for b in plan(1, 0)] != [b.tolist() for b in plan(2, 0)]
    groups = [{frozenset(b.tolist()) for b in plan(1, epoch)} for epoch in (0, 1)]
    assert groups[0] != groups[1]


@pytest.mark.parametrize("world_size", [3, 4])
def test_distributed_shards_are_disjoint_and_equal_in_number(world_size, caplog):
    split = fake_split()
    whole = len(TokenBatcher(split, 120, 1, (0, 2, 3)).epoch_batches(0))
    assert whole % world_size  # a count the ranks cannot split evenly: some batches left out
    with caplog.at_level(logging.INFO):
        shards = [
            TokenBatcher(split, 120, 1, (0, 2, 3), rank=r, world_size=world_size).epoch_batches(0)
            for r in range(world_size)
        ]
    # left out, and said so
    assert f"epoch 0: {whole} batches for {world_size} ranks; the last {whole % world_size} " in (
        caplog.text
    )
    seen = [set(np.concatenate(s).tolist()) for s in shards]
    assert all(seen) and sum(map(len, seen)) == len(set().union(*seen))  # disjoint
    # every rank as many batches (collective ops stay in step): the whole count rounded down
    assert [len(s) for s in shards] == [whole // world_size] * world_size


def greedy_cuts(sorted_lengths, max_tokens):
    """Reference for plan_batches: walk the sorted examples one at a time and cut when the
    next one would push (longest so far) x (batch size) over max_tokens."""
    sizes, size, longest = [], 0, 0
    for length in sorted_lengths:
        if size and max(longest, length) * (size + 1) > max_tokens:
            sizes.append(size)
            size, longest = 0, 0
        size, longest = size + 1, max(longest, length)
    return sizes + [size]


@pytest.mark.parametrize("max_tokens", [1, 7, 64, 1000])
def test_plan_batches_matches_the_one_at_a_time_greedy_cut(max_tokens):
    lengths = np.random.default_rng(max_tokens).integers(1, 80, 3000)
    plan = plan_batches(lengths, max_tokens, None)
    assert [len(b) for b in plan] == greedy_cuts(np.sort(lengths), max_tokens)
    assert (np.concatenate(plan) == np.argsort(lengths, kind="stable")).all()


def test_length_sorting_keeps_padding_low():
    lengths = np.random.default_rng(0).integers(1, 60, 2000)
    plan = plan_batches(lengths, 1000, np.random.default_rng(0))
    padded = sum(len(b) * lengths[b].max() for b in plan)
    assert 1 - lengths.sum() / padded < 0.05


@pytest.mark.parametrize("rows,sizes", [(1, [1]), (2, [1, 1]), (5, [3, 2])])
def test_halves_split_a_batch_along_its_sentences(rows, sizes):
    """An out-of-memory retry splits a batch in two; a single sentence stays whole."""
    src = torch.arange(rows * 4).view(rows, 4)
    tgt = torch.arange(rows * 3).view(rows, 3) + 100
    batch = Batch(src, src > 2, tgt, tgt + 1)
    halves = batch.halves()
    assert [len(h.src) for h in halves] == sizes
    for field in ("src", "src_mask", "tgt_in", "tgt_out"):
        joined = torch.cat([getattr(h, field) for h in halves])
        assert torch.equal(joined, getattr(batch, field)), field


def test_a_budget_below_the_longest_example_names_the_setting_to_change():
    """The trainer's message names data.max_tokens and data.max_len; a benchmark's, its own
    option only (it has no data.max_len)."""
    from types import SimpleNamespace

    split = SimpleNamespace(src_lens=np.array([20, 55]), tgt_lens=np.array([40, 30]))
    with pytest.raises(DataError, match=r"^data.max_tokens=50 is smaller than the longest "
                       r"example \(56 tokens\); raise it or lower data.max_len$"):  # fmt: skip
        TokenBatcher(split, 50, 1, (0, 1, 2))
    with pytest.raises(DataError, match=r"^--max-tokens=50 .* \(56 tokens\); raise it$"):
        TokenBatcher(split, 50, 1, (0, 1, 2), budget="--max-tokens")
    assert TokenBatcher(split, 56, 1, (0, 1, 2)).max_tokens == 56  # just enough: it fits
