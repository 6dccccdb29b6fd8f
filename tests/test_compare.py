import json

from transformer.compare import load_run, main


def fake_run(path, bleu):
    """A finished run whose every figure differs from the others (test BLEU ``bleu``,
    best valid BLEU ``bleu - 3``, steps 10, best step 5, ...), so that a table column
    showing the wrong one is told apart."""
    path.mkdir()
    metrics = {
        "model": "transformer.transformer_model.Transformer",
        "parameters": 1_000_000,
        "steps": 10,
        "best_step": 5,
        "best_valid_bleu": bleu - 3,
        "train_seconds": 754.0,
        "train_tokens_per_s": 1000,
        "device": "cpu",
        "test2016": {
            "bleu": bleu,
            "chrf": 50.0,
            "bleu_signature": "sig",
            "chrf_signature": "chrf-sig",
            "decode_sentences_per_s": 3.0,
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
    assert "| a | Transformer | 1.0 | 30.50 | 50.00 | 754 | 1000 | 3.0 | 5 | 27.50 | cpu |" in md
    assert "| b | Transformer | 1.0 | 28.25 | 50.00 | 754 | 1000 | 3.0 | 5 | 25.25 | cpu |" in md
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
    assert "| a | Transformer | 1.0 | 30.50 | 50.00 | - | - | 754 | 1000 | 3.0 | 5 | 27.50 |" in md
    assert "| b | Transformer | 1.0 | - | - | 28.25 | 50.00 | 754 | 1000 | 3.0 | 5 | 25.25 |" in md


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
    assert "b/valid_log.csv line 2: no number" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 30.5)
    (tmp_path / "file").write_text("")
    assert main([str(run), "--out", str(tmp_path / "file" / "cmp")]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path}/file/cmp: Not a directory\n"
