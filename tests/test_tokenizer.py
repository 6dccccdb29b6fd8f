import os
import random

import pytest

from transformer.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPM_MAX_SENTENCE_BYTES,
    UNK_ID,
    Tokenizer,
    copy_into,
    private_name,
    train_or_load,
)

TEXT = [
    "Zwei junge Männer spielen Fußball.",
    "A dog runs through the snow.",
    "Eine Frau liest ein Buch im Park.",
    "Two children are playing on the beach.",
] * 30


def test_round_trip_and_special_ids(tmp_path):
    tok = train_or_load(TEXT, tmp_path, vocab_size=120)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert len({PAD_ID, UNK_ID, BOS_ID, EOS_ID}) == 4
    ids = tok.encode(TEXT[:4])
    assert all(PAD_ID not in seq and EOS_ID not in seq for seq in ids)
    assert tok.decode(ids) == TEXT[:4]
    assert tok.decode([ids[0] + [EOS_ID, PAD_ID]]) == [TEXT[0]]  # specials are dropped


def test_cache_is_reused_and_keyed_by_corpus(tmp_path):
    first = train_or_load(TEXT, tmp_path, vocab_size=120)
    mtime = first.path.stat().st_mtime_ns
    again = train_or_load(TEXT, tmp_path, vocab_size=120)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    other = train_or_load(TEXT[:-1], tmp_path, vocab_size=120)
    assert other.path != first.path


def test_a_generator_of_sentences_is_hashed_and_trained_on(tmp_path):
    """Hashing the text used a generator up, and SentencePiece then had nothing to train on."""
    tok = train_or_load((t for t in TEXT), tmp_path, vocab_size=120)
    assert tok.path == train_or_load(TEXT, tmp_path, vocab_size=120).path


def test_temporary_names_differ_within_one_process(tmp_path):
    """Two containers sharing a cache folder can both be PID 1: the pid alone named the same
    temporary file and folder, and one run deleted or overwrote the other's."""
    names = {private_name(tmp_path / "x.arrow") for _ in range(100)}
    assert len(names) == 100 and all(n.parent == tmp_path for n in names)


def test_every_setting_is_in_the_cache_key(tmp_path):
    """A cached model is reused only under the same corpus key and the same settings."""
    base = dict(vocab_size=100, model_type="unigram", character_coverage=1.0)
    base.update(input_sentence_size=2_000_000, seed=1, key="corpus-a")
    first = train_or_load(TEXT, tmp_path, **base).path
    assert train_or_load(TEXT, tmp_path, **base).path == first
    changes = dict(vocab_size=90, model_type="bpe", character_coverage=0.9995)
    changes.update(input_sentence_size=101, seed=2, key="corpus-b")
    paths = {first}
    for name, value in changes.items():
        path = train_or_load(TEXT, tmp_path, **{**base, name: value}).path
        assert path not in paths, name
        paths.add(path)


def test_decoded_sentences_hold_no_line_break(tmp_path):
    """Whatever SentencePiece gives back, no character str.splitlines breaks at survives."""
    tok = train_or_load(TEXT, tmp_path, vocab_size=120)
    breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

    class Pieces:
        def decode(self, ids):
            return [f"a{c}b" for c in breaks]

    tok.sp = Pieces()
    out = tok.decode([[5]] * len(breaks))
    assert out == ["a b"] * len(breaks)


def test_copy_into_replaces_a_stale_copy(tmp_path):
    tok = train_or_load(TEXT, tmp_path / "cache", vocab_size=120)
    stale = tmp_path / "run" / "tokenizer" / "spm.model"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older model")
    assert copy_into(tok, tmp_path / "run", "tokenizer/spm.model") == stale
    assert stale.read_bytes() == tok.path.read_bytes()


def test_sentencepiece_refusals_are_one_readable_line(tmp_path):
    """SentencePiece's failed check ("INTERNAL: src/trainer_interface.cc(638) [...]") becomes
    a ValueError with its reason and the size asked for."""
    with pytest.raises(ValueError) as refused:
        train_or_load(TEXT, tmp_path, vocab_size=5)
    message = str(refused.value)
    assert message.startswith("SentencePiece cannot train 5 pieces: Vocabulary size is smaller")
    assert "trainer_interface" not in message
    assert not list(tmp_path.glob("*.model"))


def test_sentences_longer_than_sentencepieces_limit_are_trained_on(tmp_path):
    """SentencePiece leaves out, silently at our log level, every sentence over its
    ``max_sentence_length`` (4,192 bytes by default): a corpus of paragraphs, one language
    of which had only longer lines, tokenized that language into <unk> and single letters."""
    rng = random.Random(0)
    german = " ".join(TEXT[0::2][:2]).split()
    paragraphs = [" ".join(rng.choices(german, k=800)) for _ in range(10)]  # ~4,700 bytes
    assert all(len(p.encode()) > SPM_MAX_SENTENCE_BYTES for p in paragraphs)
    tok = train_or_load(paragraphs + TEXT[1::2], tmp_path, vocab_size=80)
    ids = tok.encode(["Zwei junge Männer spielen Fußball."])[0]  # (ß, ä: only in German)
    assert UNK_ID not in ids, tok.pieces(ids)


def test_a_damaged_cached_model_says_so_and_what_to_do(tmp_path):
    from transformer.data import DataError

    path = train_or_load(TEXT, tmp_path, vocab_size=120).path
    path.write_bytes(path.read_bytes()[:1000])  # cut by hand, or a disk fault
    with pytest.raises(DataError, match=r"damaged cache .*delete it and run again"):
        train_or_load(TEXT, tmp_path, vocab_size=120)


def test_the_tokenizer_is_the_same_whatever_the_machines_core_count(tmp_path, monkeypatch):
    """SentencePiece's pieces depend on its thread count, which was the machine's cores: a
    16-core GPU machine and a 2-core one trained different Multi30k tokenizers from the same
    corpus and seed (and so different batches, and different runs)."""
    models = []
    for cores in (2, 16):
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        tok = train_or_load(TEXT, tmp_path / f"cores{cores}", vocab_size=120)
        models.append(tok.path.read_bytes())
    assert models[0] == models[1]


def test_another_sentencepiece_release_trains_its_own_model(tmp_path, monkeypatch):
    """SentencePiece 0.2.2 and 0.2.3 cut Multi30k into other pieces (and so other batches):
    a model cached by one is not reused by the other."""
    import sentencepiece

    first = train_or_load(TEXT, tmp_path, vocab_size=120).path
    monkeypatch.setattr(sentencepiece, "__version__", "0.0.1")
    assert train_or_load(TEXT, tmp_path, vocab_size=120).path != first


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    """SentencePiece's own defaults (no pad, unk 0, bos 1, eos 2) would make the batches'
    padding and EOS other pieces than the model's."""
    import sentencepiece as spm

    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=str(prefix), vocab_size=40, minloglevel=2
    )
    with pytest.raises(ValueError, match="plain.model: not trained with this project's special"):
        Tokenizer(f"{prefix}.model")
