import json

import pytest

from transformer.compare import load_run, main


def fake_run(path, bleu):
    """A finished run whose every figure differs from the others within it and from those
    of a run of another ``bleu`` (test BLEU ``bleu``, chrF ``bleu + 20``, best valid BLEU
    ``bleu - 3``, best step ``int(bleu)`` of twice as many steps, ...), so that a table
    column or row showing the wrong one is told apart."""
    path.mkdir()
    metrics = {
        "model": "transformer.transformer_model.Transformer",
        "parameters": int(bleu) * 100_000,
        "steps": int(bleu) * 2,
        "best_step": int(bleu),
        "best_valid_bleu": bleu - 3,
        "train_seconds": bleu * 20,
        "train_tokens_per_s": int(bleu * 100),
        "device": f"cpu{int(bleu)}",
        "test2016": {
            "bleu": bleu,
            "chrf": bleu + 20,
            "bleu_signature": "sig",
            "chrf_signature": "chrf-sig",
            "decode_sentences_per_s": bleu / 10,
        },
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "valid_log.csv").write_text(
        "step,epoch,train_seconds,valid_loss,valid_nll,valid_ppl,valid_bleu\n"
        f"5,0,6.0,3.0,2.9,18.2,{bleu - 3}\n10,0,12.0,2.9,2.8,16.4,\n"
    )
    return path


def test_table_and_plot(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 30.5), fake_run(tmp_path / "b", 28.25)
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    # run, model, params, test BLEU, chrF, train s, tok/s, decode sent/s, best step and BLEU
    assert (
        "| a | Transformer | 3.0 | 30.50 | 50.50 | 610 | 3050 | 3.05 | 30 | 27.50 | cpu30 |" in md
    )
    assert (
        "| b | Transformer | 2.8 | 28.25 | 48.25 | 565 | 2825 | 2.825 | 28 | 25.25 | cpu28 |" in md
    )
    assert "BLEU signature: `sig`; chrF signature: `chrf-sig`" in md  # both columns' own
    assert (tmp_path / "out" / "valid_bleu.png").stat().st_size > 1000
    # the plotted curve: (training seconds, greedy valid BLEU) of the rows that have one
    assert load_run(a)["curve"] == [(6.0, 27.5)]


def test_runs_with_other_test_splits_share_a_table(tmp_path, capsys):
    """A run without test2016 (data.test_splits=[], or another test set) was a KeyError."""
    a, b = fake_run(tmp_path / "a", 30.5), fake_run(tmp_path / "b", 28.25)
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["test2017"] = metrics.pop("test2016")
    (b / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert (
        "| a | Transformer | 3.0 | 30.50 | 50.50 | - | - | 610 | 3050 | 3.05 | 30 | 27.50 |" in md
    )
    assert (
        "| b | Transformer | 2.8 | - | - | 28.25 | 48.25 | 565 | 2825 | 2.825 | 28 | 25.25 |" in md
    )


def test_without_out_it_writes_under_the_ignored_outputs_folder(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "a", 30.5)
    monkeypatch.chdir(tmp_path)
    assert main([str(run)]) == 0
    assert (tmp_path / "outputs" / "compare" / "compare.md").is_file()
    assert not (tmp_path / "results").exists()


def test_missing_or_incomplete_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main([str(tmp_path / "half")]) == 1
    assert "no metrics.json (is the run finished?)" in capsys.readouterr().err
    assert main([str(tmp_path / "none")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_a_damaged_run_folder_is_a_clear_error(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 30.5)
    (run / "metrics.json").write_text("{not json")
    assert main([str(run)]) == 1
    assert "a/metrics.json: not JSON" in capsys.readouterr().err
    (run / "metrics.json").write_text(json.dumps({"model": "x", "parameters": 1}))
    assert main([str(run)]) == 1
    assert "metrics.json: no train_seconds, train_tokens_per_s" in capsys.readouterr().err
    fake = tmp_path / "b"
    fake_run(fake, 1.0)
    (fake / "valid_log.csv").write_text("step,train_seconds,valid_bleu\n5,six,30\n")
    assert main([str(fake)]) == 1
    assert "b/valid_log.csv line 2: train_seconds must be a number, got 'six'" in (
        capsys.readouterr().err
    )


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 30.5)
    (tmp_path / "file").write_text("")
    assert main([str(run), "--out", str(tmp_path / "file" / "cmp")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path}/file/cmp: Not a directory\n"


HEADER = "step,epoch,train_seconds,valid_loss,valid_nll,valid_ppl,valid_bleu\n"
ROW = "5,0,6.0,3.0,2.9,18.2,27.5\n"


@pytest.mark.parametrize(
    "text, error",
    [
        # the last row cut short: a partial line, or a whole one missing only its line end
        (HEADER + ROW + "10,0,12", " line 3: 3 fields, the header names 7"),
        (HEADER + ROW + "10,0,12.0,2.9,2.8,16.4,2", " line 3: cut short"),
        # a header that lost a column: every value would be read under its neighbour's name
        (HEADER.replace("epoch,", "") + ROW, " line 2: 7 fields, the header names 6"),
        (HEADER.replace("valid_bleu", "valid_b") + ROW, " line 1: the header has no valid_bleu"),
        ("", ": empty, not even the header"),
        (HEADER + ROW.replace("27.5", "27.5x"), " line 2: valid_bleu must be a number"),
        (HEADER + ROW.replace("6.0", "nan"), " line 2: train_seconds must be a number"),
    ],
    ids=["partial-row", "no-line-end", "header-lost-a-column", "no-bleu-column", "empty",
         "bleu-not-a-number", "seconds-nan"],
)  # fmt: skip
def test_a_damaged_valid_log_is_one_line_naming_file_and_line(tmp_path, capsys, text, error):
    """Most of these runs were left out of the plot, or plotted from the wrong columns, and
    the command exited 0."""
    run = fake_run(tmp_path / "a", 30.5)
    (run / "valid_log.csv").write_text(text)
    assert main([str(run), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {run}/valid_log.csv{error}"), out.err
    assert out.err.count("\n") == 1
    assert out.out == "" and not (tmp_path / "out").exists()


def test_a_run_that_never_validated_is_a_warning_not_a_silent_gap(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 30.5), fake_run(tmp_path / "b", 28.25)
    (b / "valid_log.csv").write_text(HEADER)  # the header the trainer writes first
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert (
        out.err
        == f"warning: {b}/valid_log.csv: no validation BLEU logged, so no curve in the plot\n"
    )
    assert "| b | Transformer |" in out.out  # its table row stands
    # the trainer's own lines end in \r\n; a checkout may have made them \n: both are whole
    (a / "valid_log.csv").write_text((HEADER + ROW).replace("\n", "\r\n"))
    assert load_run(a)["curve"] == [(6.0, 27.5)]


@pytest.mark.parametrize(
    "change, error",
    [
        ({"train_seconds": "12"}, 'train_seconds must be a number, got "12"'),
        ({"best_step": None}, "best_step must be an integer, got null"),
        ({"parameters": True}, "parameters must be an integer, got true"),
        ({"model": 5}, "model must be text, got 5"),
        ({"device": ["cpu"]}, 'device must be text, got ["cpu"]'),
        ({"test2016": {"bleu": "30.5", "chrf": 5.0}}, 'test2016.bleu must be a number, got "30.5"'),
        ({"test2016": {"bleu": 30.5}}, "no test2016.chrf"),
        ({"test2016": {"bleu": 30.5, "chrf": 5.0, "decode_sentences_per_s": None}},
         "test2016.decode_sentences_per_s must be a number, got null"),
    ],
)  # fmt: skip
def test_a_wrongly_typed_metric_is_one_line_naming_file_and_key(tmp_path, capsys, change, error):
    """Each of these was a traceback (a format code for a str, None / 1e6, ...)."""
    run = fake_run(tmp_path / "a", 30.5)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, **change}))
    assert main([str(run), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {run}/metrics.json: {error}\n"


def test_scores_that_are_no_object_in_one_run_are_named(tmp_path, capsys):
    """ "test2016": "41" beside a run with test2016 scores was a TypeError traceback (and
    alone, a column dropped without a word)."""
    a, b = fake_run(tmp_path / "a", 30.5), fake_run(tmp_path / "b", 31.5)
    metrics = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**metrics, "test2016": "41"}))
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        f"error: {b}/metrics.json: test2016 must be an object of scores, as in "
        f'{a}/metrics.json, got "41"\n'
    )


def test_runs_of_other_directions_are_refused_and_same_names_told_apart(tmp_path, capsys):
    """A de-en and a fr-en run shared one table, under one "test2016 BLEU" column, without
    a word; two runs named transformer were two rows and two legend entries of one name."""
    runs = []
    for pair in ("de-en", "fr-en"):
        (tmp_path / pair).mkdir()
        run = fake_run(tmp_path / pair / "transformer", 30.0)
        src, tgt = pair.split("-")
        (run / "config.yaml").write_text(
            f"data:\n  name: multi30k\n  src_lang: {src}\n  tgt_lang: {tgt}\n"
        )
        runs.append(run)
    assert main([*map(str, runs), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "the runs translate different corpora or directions" in err
    assert "(multi30k de-en)" in err and "(multi30k fr-en)" in err
    (runs[1] / "config.yaml").write_text(
        "data:\n  name: multi30k\n  src_lang: de\n  tgt_lang: en\n"
    )
    assert main([*map(str, runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| de-en/transformer |" in md and "| fr-en/transformer |" in md
