from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_or_load

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
