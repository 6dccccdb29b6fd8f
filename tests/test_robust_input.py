"""translate.py keeps line alignment and never crashes, whatever bytes or Unicode it is fed.

Property tests (hypothesis) drive the same path as translate.py (decode_lines ->
encode_sources -> translate_ids -> format_output) on a tiny model trained once per module;
one subprocess run feeds translate.py itself the nastiest input we know of.
"""

import gzip
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from transformer.data import DataError, decode_lines
from transformer.translate_cli import format_output
from transformer.translator import encode_sources, load_for_inference, translate_ids

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    """(checkpoint path, model, src tokenizer, tgt tokenizer, data.max_len) of a 6-step model."""
    model, src_tok, tgt_tok, cfg = load_for_inference(tiny_ckpt, CPU)
    return tiny_ckpt, model, src_tok, tgt_tok, cfg["data"]["max_len"]


def translate_bytes(tiny, raw: bytes, beam: int = 1, nbest: int = 1) -> tuple[list, list]:
    """(input lines, output lines) exactly as translate.py computes them."""
    _, model, src_tok, tgt_tok, max_len = tiny
    lines = decode_lines(raw, "stdin") if raw else []
    decode = OmegaConf.create({"beam_size": beam, "nbest": nbest, "max_len_b": 5})
    ids = encode_sources(lines, src_tok, max_len)
    _, out = format_output(translate_ids(model, ids, tgt_tok, decode, CPU), tgt_tok, nbest)
    return lines, out


def expected_line_count(raw: bytes) -> int:
    """Lines a reader splitting on \\n sees (a missing final newline still ends a line)."""
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


def assert_aligned(lines: list[str], out: list[str], n: int) -> None:
    assert len(lines) == len(out) == n
    written = "".join(line + "\n" for line in out)
    assert written.splitlines() == out  # no output line hides a line break of any kind
    for src, hyp in zip(lines, out):
        if not src.strip():
            assert hyp == ""


nasty_text = st.lists(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)),  # anything UTF-8 can encode
        max_size=40,
    ),
    max_size=6,
).map(lambda parts: "\n".join(parts))
nasty_pieces = st.sampled_from(
    [b"\x00", b"\r", b"\r\n", b"\n", b"\xff\xfe", b"\xc3", b"\xe2\x80\xa8", b"\xef\xbb\xbf", b" "]
)
nasty_bytes = st.lists(st.one_of(st.binary(max_size=12), nasty_pieces), max_size=12).map(b"".join)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(text=nasty_text, final_newline=st.booleans())
def test_any_unicode_keeps_line_alignment(tiny, text, final_newline):
    raw = (text + ("\n" if final_newline else "")).encode("utf-8")
    lines, out = translate_bytes(tiny, raw)
    assert_aligned(lines, out, expected_line_count(raw))


@SETTINGS
@given(raw=nasty_bytes)
def test_any_bytes_keep_line_alignment(tiny, raw):
    lines, out = translate_bytes(tiny, raw)
    assert_aligned(lines, out, expected_line_count(raw))


@SETTINGS
@given(raw=nasty_bytes)
def test_nbest_tsv_indexes_every_input_in_order(tiny, raw):
    lines, out = translate_bytes(tiny, raw, beam=3, nbest=2)
    fields = [row.split("\t") for row in out]
    assert all(len(f) == 3 for f in fields)
    index = [int(f[0]) for f in fields]
    assert index == sorted(index) and set(index) == set(range(len(lines)))
    # two rows per input with subwords, one empty row per input with none (blank, or only
    # characters the tokenizer drops): every best-only output passed "at most 2"
    counts = [index.count(i) for i in range(len(lines))]
    ids = encode_sources(lines, tiny[2], tiny[4])
    assert counts == [2 if seq else 1 for seq in ids], (counts, lines)


def test_the_best_translation_is_the_first_of_each_nbest_list():
    """With decode.nbest > 1, the translation returned (and scored against ref=) is each
    list's first, best-scored one; the TSV numbers the inputs from ``first``."""

    class Tok:
        def decode(self, ids):
            return [" ".join(map(str, seq)) for seq in ids]

    nbest = [[([5, 6], -0.1), ([7], -0.9)], [], [([8], -0.2), ([9], -0.3)]]
    best, lines = format_output(nbest, Tok(), 2, first=4)
    assert best == ["5 6", "", "8"]
    assert lines == ["4\t-0.1000\t5 6", "4\t-0.9000\t7", "5\t0.0000\t", "6\t-0.2000\t8",
                     "6\t-0.3000\t9"]  # fmt: skip


def test_translate_cli_on_nasty_input(tiny, tmp_path):
    ckpt = tiny[0]
    raw = b"".join(
        [
            b"\xef\xbb\xbfEin Hund.\n",  # byte-order mark
            b"Ein\x00Mann\r\n",  # NUL, CRLF
            b"kaputt \xff\xfe\xc3\n",  # invalid UTF-8
            b"\n",  # empty
            b"  \t \n",  # whitespace only
            "Zwei\u2028Frauen\x85und\x1cKinder.\n".encode(),  # separators str.splitlines honours
            ("Hund " * 2000).encode() + b"\n",  # far longer than data.max_len
            "\u202e\U0001f600 \u0301\ufffd".encode(),  # bidi override, emoji, lone combining
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "translate.py"), f"ckpt={ckpt}", "device=cpu"],
        input=raw,
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    lines = out.stdout.decode("utf-8").split("\n")
    assert len(lines) == 9 and lines[-1] == ""  # 8 inputs, each ended by a newline
    assert lines[3] == lines[4] == ""
    assert "Traceback" not in stderr
    assert "1 line(s) not valid UTF-8" in stderr and "(first: line 3)" in stderr
    assert "2 line(s) with control characters" in stderr and "(first: line 2)" in stderr
    assert "truncated (line 7)" in stderr


def test_control_characters_are_repaired_and_counted(caplog):
    caplog.set_level(logging.WARNING)
    lines = decode_lines("a\x00b\nok\n\x1bc\x7f\nd\u2029e\n".encode(), "corpus.de")
    assert lines == ["a b", "ok", " c ", "d e"]
    assert (
        "corpus.de: 3 line(s) with control characters; replaced with spaces (first: line 1)"
        in caplog.text
    )
    assert caplog.text.count("control characters") == 1


def test_a_byte_order_mark_is_dropped_from_the_first_line_only(tmp_path):
    from transformer.data import decode_lines, iter_lines

    raw = b"\xef\xbb\xbfEin Hund.\n\xef\xbb\xbfZwei\n"
    expected = ["Ein Hund.", "\ufeffZwei"]  # further in, U+FEFF is text, not a file mark
    assert decode_lines(raw, "x") == expected
    (tmp_path / "f.txt").write_bytes(raw)
    assert list(iter_lines(tmp_path / "f.txt")) == expected


def test_every_control_character_but_tab_becomes_a_space():
    from transformer.data import decode_lines

    assert decode_lines(b"a\x0bb\x0cc\rd\x00e\x1ff\tg\r\n", "x") == ["a b c d e f\tg"]


def translate_with(compose, *overrides: str) -> list[str]:
    from transformer import translate_cli

    cfg = compose(["device=cpu", *overrides], name="translate")
    return translate_cli.translate(cfg, overrides=[])


def test_gzipped_input_ref_and_output_as_the_corpora_are(tiny, compose, tmp_path, capsys):
    """input= of a .gz (the shipped test sets are) was translated as its compressed bytes:
    82 lines of garbage for 1,000 sentences, exit 0."""
    src = "Ein Hund läuft im Schnee.\nZwei Männer spielen Fußball.\n\nEine Frau.\n"
    (tmp_path / "in.txt").write_text(src, "utf-8")
    (tmp_path / "in.de.gz").write_bytes(gzip.compress(src.encode()))
    (tmp_path / "ref.en.gz").write_bytes(gzip.compress(b"A dog.\nTwo men.\n\nA woman.\n"))
    ckpt = f"ckpt={tiny[0]}"
    plain = translate_with(compose, ckpt, f"input={tmp_path / 'in.txt'}")
    capsys.readouterr()
    gz = translate_with(
        compose, ckpt, f"input={tmp_path / 'in.de.gz'}", f"ref={tmp_path / 'ref.en.gz'}",
        f"output={tmp_path / 'out.en.gz'}",
    )  # fmt: skip
    assert gz == plain and len(plain) == 4
    written = gzip.decompress((tmp_path / "out.en.gz").read_bytes()).decode()
    assert written == "".join(line + "\n" for line in plain)
    assert "BLEU" in capsys.readouterr().err
    # the translations scored are the output against ref=: their own text scores 100
    (tmp_path / "self.en").write_text(written, "utf-8")
    translate_with(compose, ckpt, f"input={tmp_path / 'in.txt'}", f"ref={tmp_path / 'self.en'}")
    assert "chrF 100.00\n" in capsys.readouterr().err
    (tmp_path / "bad.gz").write_bytes(b"Ein Hund.\n")
    with pytest.raises(DataError, match=r"^input=.*bad.gz: not a readable gzip file"):
        translate_with(compose, ckpt, f"input={tmp_path / 'bad.gz'}")


def test_a_path_yaml_reads_as_a_number_is_its_digits(tiny, compose, tmp_path, monkeypatch):
    """input=2024 reached the code as an int: a TypeError traceback from Path()."""
    monkeypatch.chdir(tmp_path)
    Path("2024").write_text("Ein Hund.\nZwei Katzen.\n", "utf-8")
    best = translate_with(compose, f"ckpt={tiny[0]}", "input=2024", "output=2025")
    assert Path("2025").read_text("utf-8") == "".join(line + "\n" for line in best)
    assert len(best) == 2
    Path("007").write_text("Ein Hund.\n", "utf-8")  # no int (Hydra has no leading-zero ints)
    assert len(translate_with(compose, f"ckpt={tiny[0]}", "input=007")) == 1
    with pytest.raises(ValueError, match="^input must be a path or name, got 1.5: quote it"):
        translate_with(compose, f"ckpt={tiny[0]}", "input=1.5")


def test_a_dash_is_stdin_and_stdout(tiny, compose, tmp_path, monkeypatch, capsys):
    """output=- wrote a file named "-"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Ein Hund.\nZwei.\n")))
    best = translate_with(compose, f"ckpt={tiny[0]}", "input=-", "output=-")
    assert capsys.readouterr().out == "".join(line + "\n" for line in best)
    assert len(best) == 2 and not Path("-").exists()


def test_output_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    from transformer import translate_cli

    if Path("/dev/full").exists():  # every write fails: No space left on device
        with pytest.raises(DataError, match="^output=/dev/full: No space left on device$"):
            translate_cli.write_output("/dev/full", "a\n")
    # an existing read-only file was found only after translating (root may write it: the
    # permission is what os.access reports)
    out = tmp_path / "out.txt"
    out.write_text("old")
    real = os.access
    monkeypatch.setattr(translate_cli.os, "access", lambda p, m: Path(p) != out and real(p, m))
    with pytest.raises(PermissionError, match="the file exists and is not writable"):
        translate_cli.check_output(str(out))


def test_a_failed_output_write_leaves_the_earlier_file_whole(tmp_path):
    """A write cut short (disk full; here a file size limit) left the earlier output=
    truncated to what fitted. The write now goes beside the file and is renamed over it;
    a link's target is what is replaced, and the link stays a link."""
    out, link = tmp_path / "out.txt", tmp_path / "link.txt"
    out.write_text("old\n")
    link.symlink_to(out)
    script = (
        "import resource, signal; from transformer import translate_cli\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        f"translate_cli.write_output({str(link)!r}, 'neu\\n' * 5000)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode != 0 and "output=" in run.stderr and "File too large" in run.stderr
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "link.txt", "out.txt"]  # fmt: skip
    from transformer import translate_cli

    translate_cli.write_output(str(link), "neu\n")
    assert link.is_symlink() and out.read_text() == "neu\n"


def test_translations_at_the_length_limit_are_reported(tiny, compose, tmp_path, caplog):
    """A hypothesis that reaches a * len(src) + b ends in a forced EOS: maybe cut short."""
    from transformer.translate_cli import report_cut

    caplog.set_level(logging.WARNING)
    (tmp_path / "in.txt").write_text("Ein Hund.\n\nZwei Katzen.\n", "utf-8")
    limit = ["decode.max_len_a=0", "decode.max_len_b=1"]  # EOS forced at once: all cut
    best = translate_with(compose, f"ckpt={tiny[0]}", f"input={tmp_path / 'in.txt'}", *limit)
    assert best == ["", "", ""]
    assert "2 translation(s) stopped at the output length limit (decode.max_len_a=0 x " in (
        caplog.text
    )
    assert "may be cut short (line 1, 3)" in caplog.text
    # the boundary: limit 1.0 * 3 + 2 = 5 tokens, EOS included: 4 words reach it, 3 do not
    model = type("Capped", (), {"max_target_len": 100})()
    opts = OmegaConf.create({"max_len_a": 1.0, "max_len_b": 2})
    caplog.clear()
    report_cut(model, [[5, 6, 2], [5, 6, 2]], [[([1, 2, 3, 4], 0.0)], [([1, 2, 3], 0.0)]], opts, 7)
    assert "1 translation(s) stopped" in caplog.text and "(line 7)" in caplog.text


def test_the_prompt_repairs_bytes_that_are_not_utf8(typed, caplog):
    """Python hands a bad byte to input() as a lone surrogate, which SentencePiece refused:
    a traceback that ended the session."""
    from transformer import translate_cli

    caplog.set_level(logging.WARNING)
    typed("\udce4rger", "gut")
    seen = []
    done = translate_cli.interactive(lambda lines: (seen.extend(lines) or lines, lines))
    assert seen == done == ["\ufffdrger", "gut"]
    assert "the prompt: 1 line(s) not valid UTF-8" in caplog.text


def test_a_carriage_return_inside_a_line_is_reported(caplog):
    caplog.set_level(logging.WARNING)
    assert decode_lines(b"Ein Hund.\rZwei.\r\nDrei.\r\n", "old.txt") == ["Ein Hund. Zwei.", "Drei."]
    assert "old.txt: 1 line(s) with a carriage return inside" in caplog.text
    assert "old Mac line ends" in caplog.text


@pytest.mark.parametrize(
    "drop,message",
    [
        ("tokenizer", "has no 'tokenizer' entry"),
        ("model_kwargs", "has no 'model_kwargs' entry"),
        ("config.data", "its config has no 'data' entry"),
        ("tokenizer.tgt_sha256", "its tokenizer has no 'tgt_sha256' entry"),
    ],
)
def test_a_checkpoint_missing_an_entry_is_one_clear_error(tiny_ckpt, tmp_path, drop, message):
    """A KeyError traceback from deep in the loading before."""
    from transformer import checkpoint

    ckpt = checkpoint.load(tiny_ckpt)
    *parents, key = drop.split(".")
    node = ckpt
    for p in parents:
        node = node[p]
    del node[key]
    path = tiny_ckpt.parent / f"without_{drop}.pt"  # beside the run's tokenizer folder
    try:
        checkpoint.save(path, ckpt)
        with pytest.raises(checkpoint.CheckpointError, match=f"without_{drop}.pt: {message}"):
            load_for_inference(path, CPU)
    finally:
        path.unlink(missing_ok=True)


def test_the_progress_bar_counts_what_is_decoded(tiny, compose, tmp_path, capsys):
    """The bar's total counted non-blank lines, but a line of characters the tokenizer
    normalises away (a zero-width space) has no subwords and is never decoded: the bar
    stopped at 2/3."""
    _, _, src_tok, _, _ = tiny
    assert src_tok.encode("\u200b") == []  # nothing to decode in this line
    (tmp_path / "in.txt").write_text("Ein Hund.\n\u200b\nZwei Männer.\n", "utf-8")
    capsys.readouterr()
    best = translate_with(compose, f"ckpt={tiny[0]}", f"input={tmp_path / 'in.txt'}")
    assert len(best) == 3 and best[1] == ""
    bar = capsys.readouterr().err.split("\r")[-1]
    assert " 2/2 " in bar, bar
