"""python -m transformer.evaluate: hypotheses on disk, scores recomputable from them."""

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from omegaconf import OmegaConf

from transformer import checkpoint
from transformer.evaluate import decode_setting, default_names, main
from transformer.translator import load_for_inference, translate_lines

ROOT = Path(__file__).resolve().parent.parent


def test_scores_match_the_written_hypotheses(tiny_ckpt, corpus_root, tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(
        checkpoint, "load", lambda path, _load=checkpoint.load: reads.append(path) or _load(path)
    )
    out = tmp_path / "eval"
    specs = ["greedy", "beam:beam_size=1", "beam:beam_size=3,length_penalty=1.0"]
    argv = [str(tiny_ckpt), "--names", "tiny", "--split", "valid", "--out", str(out)]
    assert main([*argv, "--data-dir", str(corpus_root), "--decode", *specs]) == 0
    # read twice: checked before any decoding (a damaged later checkpoint fails before the
    # earlier ones are decoded), then once for its weights and its step
    assert reads == [tiny_ckpt, tiny_ckpt]
    rows = json.loads((out / "results.json").read_text())
    assert [r["decode"] for r in rows] == [
        "greedy",
        "beam.beam_size=1",
        "beam.beam_size=3.length_penalty=1.0",
    ]
    assert rows[2]["decode_config"]["beam_size"] == 3
    assert rows[2]["decode_config"]["length_penalty"] == 1.0
    refs = (corpus_root / "multi30k" / "valid.en").read_text("utf-8").splitlines()
    hyps = {}
    for r in rows:
        assert r["hypotheses"] == f"tiny/valid.{r['decode']}.hyp"  # relative to out
        assert (r["data"], r["src_lang"], r["tgt_lang"]) == ("multi30k", "de", "en")
        hyps[r["decode"]] = (out / r["hypotheses"]).read_text("utf-8")
        lines = hyps[r["decode"]].splitlines()
        assert len(lines) == len(refs)
        assert r["bleu"] == round(sacrebleu.corpus_bleu(lines, [refs]).score, 2)
        # (a 6-step model's BLEU is 0 against any reference: chrF tells them apart)
        assert r["chrf"] == round(sacrebleu.corpus_chrf(lines, [refs]).score, 2)
        if r["seconds"] >= 0.05:  # seconds are rounded to 0.01
            assert r["sentences_per_s"] == pytest.approx(len(lines) / r["seconds"], rel=0.15)
    assert hyps["greedy"] == hyps["beam.beam_size=1"]
    # each file is its own setting's: beam 3's equals translating the split directly with
    # conf/decode/greedy.yaml at beam 3 (every file was greedy's when evaluate decoded all
    # with the first setting, and the test still passed)
    model, src_tok, tgt_tok, cfg = load_for_inference(tiny_ckpt, torch.device("cpu"))
    beam3 = OmegaConf.merge(
        OmegaConf.load(ROOT / "conf" / "decode" / "greedy.yaml"),
        {"beam_size": 3, "length_penalty": 1.0},
    )
    sources = (corpus_root / "multi30k" / "valid.de").read_text("utf-8").splitlines()
    direct = translate_lines(model, sources, src_tok, tgt_tok, beam3, torch.device("cpu"),
                             cfg["data"]["max_len"])  # fmt: skip
    assert hyps["beam.beam_size=3.length_penalty=1.0"].splitlines() == direct
    assert direct != hyps["greedy"].splitlines()  # the two settings are told apart
    step = rows[0]["step"]
    assert step in (3, 6)  # best.pt of the 6-step run
    assert (
        f"| tiny | {step} | beam.beam_size=3.length_penalty=1.0 |"
        in (out / "README.md").read_text()
    )


def test_the_readme_shows_each_score_under_its_own_column():
    """A tiny model scores 0 in every column, so the run above cannot tell them apart."""
    from transformer.evaluate import markdown

    row = {"name": "run", "step": 7, "decode": "beam", "split": "valid", "bleu": 31.25,
           "chrf": 55.5, "bleu_lc": 32.75, "sentences_per_s": 12.5,
           "hypotheses": "run/valid.beam.hyp", "bleu_signature": "b-sig",
           "chrf_signature": "c-sig", "bleu_lc_signature": "lc-sig"}  # fmt: skip
    md = markdown([row], "python -m transformer.evaluate x.pt", torch.device("cpu"))
    assert md.startswith("# Decoding settings on valid\n")
    assert "| model | step | decode | BLEU | chrF | BLEU (lc) | sentences/s | hypotheses |" in md
    assert "| run | 7 | beam | 31.25 | 55.50 | 32.75 | 12.5 | [valid.beam.hyp](run/valid" in md
    assert "BLEU: `b-sig`  \nchrF: `c-sig`  \nBLEU (lc): `lc-sig`\n" in md


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope", "no conf/decode/nope.yaml"),
        ("beam:beam_size", "'beam_size' is not KEY=VALUE"),
        ("beam:beamsize=3", r"no key 'beamsize' \(keys: beam_size, length_penalty, "),
        ("beam:length_penalty=[1", r"^--decode beam:length_penalty=\[1: no viable alternative"),
        ("beam:beam_size=0", r"^--decode beam:beam_size=0: decode.beam_size must be an integer"),
    ],
)
def test_bad_decode_setting_is_named(spec, message):
    """Hydra's parser error named neither --decode nor the setting."""
    with pytest.raises(ValueError, match=message):
        decode_setting(spec)


def test_unknown_decode_key_is_one_line(tiny_ckpt, tmp_path, capsys):
    assert main([str(tiny_ckpt), "--decode", "beam:nope=1", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_what_would_fail_after_decoding_fails_first(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A bad later --decode, an --out that cannot be made, or an unknown --device: before the
    first decoding (which a large split would lose), not after it."""
    from transformer import evaluate as module

    monkeypatch.setattr(module, "translate_ids", lambda *a, **k: pytest.fail("decoded"))
    out = tmp_path / "out"
    assert main([str(tiny_ckpt), "--decode", "greedy", "beam:nope=1", "--out", str(out)]) == 1
    assert "no key 'nope'" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("")
    assert main([str(tiny_ckpt), "--decode", "greedy", "--out", str(tmp_path / "file" / "x")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path}/file/x: Not a directory")
    assert main([str(tiny_ckpt), "--device", "tpu", "--out", str(out)]) == 1
    assert "not a device torch knows" in capsys.readouterr().err
    # a bad value in a later setting, or a later checkpoint that is not there
    assert main([str(tiny_ckpt), "--decode", "greedy", "beam:beam_size=0", "--out", str(out)]) == 1
    assert "decode.beam_size must be an integer >= 1, got 0" in capsys.readouterr().err
    gone = tmp_path / "gone.pt"
    assert main([str(tiny_ckpt), str(gone), "--names", "a", "b", "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"error: checkpoint not found: {gone}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{run}"], "{run} is a folder, not a checkpoint file (did you mean {ckpt}?)"),
        (["{ckpt}", "{tmp}/cut.pt", "--names", "a", "b"], "{tmp}/cut.pt: unreadable or truncated"),
        (["{ckpt}", "--data-dir", "{tmp}/nope"], "--data-dir {tmp}/nope: no such folder"),
        (["{ckpt}", "--data-dir", "{tmp}"], "--data-dir {tmp} has no multi30k/ folder"),
        (["{ckpt}", "--out", "{tmp}/file"], "--out {tmp}/file names a file, not a folder"),
    ],
)
def test_bad_paths_are_named_before_any_decoding(
    tiny_ckpt, tmp_path, capsys, monkeypatch, args, message
):
    """A run folder given as the checkpoint was 'checkpoint not found'; a truncated later
    checkpoint failed after the earlier ones were decoded; a missing --data-dir said to set
    MT_DATA_DIR; an --out naming a file said only 'File exists'."""
    from transformer import evaluate as module

    monkeypatch.setattr(module, "translate_ids", lambda *a, **k: pytest.fail("decoded"))
    (tmp_path / "cut.pt").write_bytes(tiny_ckpt.read_bytes()[:100_000])
    (tmp_path / "file").write_text("")
    fill = {"run": tiny_ckpt.parent.parent, "ckpt": tiny_ckpt, "tmp": tmp_path}
    argv = [a.format(**fill) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main([*argv, "--split", "valid", "--decode", "greedy"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {message.format(**fill)}")
    assert not list(tmp_path.rglob("*.hyp"))


def test_a_split_the_corpus_lacks_fails_before_earlier_results_are_removed(
    tiny_ckpt, corpus_root, tmp_path, capsys
):
    """A mistyped --split is found with the checkpoints, before --out is touched: an earlier
    evaluation's results there are kept."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = '[{"name": "a", "bleu": 31.0, "hypotheses": "a/valid.greedy.hyp"}]'
    (out / "results.json").write_text(earlier)
    argv = [str(tiny_ckpt), "--split", "vaild", "--decode", "greedy"]
    assert main([*argv, "--data-dir", str(corpus_root), "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: no file vaild.de[.gz] in ")
    assert (out / "results.json").read_text() == earlier


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failure_midway_leaves_no_stale_results(
    tiny_ckpt, corpus_root, tmp_path, capsys, monkeypatch, fail_at
):
    """results.json and README.md list exactly the hypotheses written so far: those of an
    earlier evaluation into the same --out were left claiming the new files' scores."""
    from transformer import evaluate as module

    calls, translate_ids = [], module.translate_ids

    def translate_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("out of memory")
        return translate_ids(*args, **kwargs)

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('[{"name": "a", "bleu": 99.0, "hypotheses": "a/x.hyp"}]')
    (out / "README.md").write_text("# Decoding settings on valid\n\n| a | 9 | greedy | 99.00 |")
    monkeypatch.setattr(module, "translate_ids", translate_or_fail)
    argv = [str(tiny_ckpt), str(tiny_ckpt), "--names", "a", "b", "--split", "valid"]
    argv += ["--decode", "greedy", "--data-dir", str(corpus_root), "--out", str(out)]
    assert main(argv) == 1
    assert "out of memory" in capsys.readouterr().err
    if fail_at == 1:
        assert not (out / "results.json").exists() and not (out / "README.md").exists()
    else:
        (row,) = json.loads((out / "results.json").read_text())
        assert row["name"] == "a" and (out / row["hypotheses"]).is_file()
        assert "99.00" not in (out / "README.md").read_text()


def test_data_dir_names_the_corpus_to_score(tiny_ckpt, corpus_root, tmp_path):
    """--data-dir replaces the folder the run was trained from."""
    other = tmp_path / "other" / "multi30k"
    other.mkdir(parents=True)
    for lang in ("de", "en"):
        lines = (corpus_root / "multi30k" / f"valid.{lang}").read_text("utf-8").splitlines()
        (other / f"valid.{lang}").write_text("\n".join(lines[:5]) + "\n", "utf-8")
    out = tmp_path / "eval"
    argv = [str(tiny_ckpt), "--split", "valid", "--decode", "greedy", "--out", str(out)]
    assert main([*argv, "--data-dir", str(other.parent)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert len((out / row["hypotheses"]).read_text("utf-8").splitlines()) == 5


def test_names_default_to_the_run_and_must_be_distinct(tiny_ckpt, tmp_path):
    a, b = tmp_path / "r1" / "checkpoints" / "a.pt", tmp_path / "r1" / "checkpoints" / "b.pt"
    c = tmp_path / "r2" / "checkpoints" / "a.pt"
    assert default_names([a, c]) == ["r1", "r2"]
    assert default_names([a, b, c]) == ["r1-a", "r1-b", "r2"]
    # two sweeps' runs of one name: it said "--names needs one distinct label", unasked
    sweeps = [tmp_path / s / "transformer_0" / "checkpoints" / "best.pt" for s in "xy"]
    assert default_names(sweeps) == ["x-transformer_0", "y-transformer_0"]
    with pytest.raises(SystemExit) as stop:
        main([str(tiny_ckpt), str(tiny_ckpt), "--names", "x", "x", "--out", str(tmp_path)])
    assert stop.value.code == 2


def test_a_null_in_a_hub_split_is_an_empty_line(tiny_ckpt, tmp_path, monkeypatch):
    """Training reads a Hub null as an empty side; evaluate crashed on it ('NoneType' object
    has no attribute 'strip')."""
    from datasets import Dataset

    import transformer.data

    pairs = Dataset.from_dict({"src": ["ein hund", None], "tgt": [None, "a dog"]})
    monkeypatch.setattr(transformer.data, "load_split", lambda data_cfg, split: pairs)
    out = tmp_path / "eval"
    assert main([str(tiny_ckpt), "--names", "t", "--decode", "greedy", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert row["sentences"] == 2 and len((out / row["hypotheses"]).read_text().splitlines()) == 2


def test_an_out_folder_with_files_of_its_own_is_refused_and_kept(tiny_ckpt, tmp_path, capsys):
    """--out DIR deleted any README.md or results.json there (a project's own notes), as
    if an earlier evaluation had written them."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# My notes\n")
    assert main([str(tiny_ckpt), "--decode", "greedy", "--out", str(out)]) == 1
    assert "its README.md is not one this tool wrote" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "# My notes\n"


def test_an_interrupt_is_one_line_and_keeps_what_was_finished(
    tiny_ckpt, corpus_root, tmp_path, capsys, monkeypatch
):
    from transformer import evaluate as module

    calls, translate_ids = [], module.translate_ids

    def interrupted_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return translate_ids(*args, **kwargs)

    monkeypatch.setattr(module, "translate_ids", interrupted_at_the_second)
    out = tmp_path / "out"
    argv = [str(tiny_ckpt), "--split", "valid", "--decode", "greedy", "beam"]
    assert main([*argv, "--data-dir", str(corpus_root), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith(f"{out} lists the 1 setting(s) finished")
    (row,) = json.loads((out / "results.json").read_text())
    assert (out / row["hypotheses"]).is_file()
