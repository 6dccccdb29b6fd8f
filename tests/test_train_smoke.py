"""End to end on a few hundred Multi30k pairs: train, resume, translate, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def test_train_resume_and_translate(compose, small_overrides, tmp_path):
    cfg = compose(small_overrides)
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["steps"] == 6
    for name in (
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "tokenizer/joint.model",
        "valid.hyp",
        "test2016.hyp",
        "metrics.json",
        "train_log.csv",
        "valid_log.csv",
    ):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert "nrefs:1|case:mixed" in saved["test2016"]["bleu_signature"]
    n_test = len((run / "test2016.hyp").read_text("utf-8").splitlines())
    assert n_test == saved["test2016"]["sentences"]

    # Resume: a higher step limit continues from last.pt instead of starting over.
    resumed = train(compose(small_overrides + ["trainer.max_steps=9"]))
    assert resumed["steps"] == 9
    steps = [int(r.split(",")[0]) for r in (run / "valid_log.csv").read_text().splitlines()[1:]]
    assert steps == [3, 6, 9]

    # translate.py with the run directory only; an empty line stays an empty line.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "translate.py"),
            f"ckpt={run}/checkpoints/best.pt",
            "device=cpu",
            "decode.beam_size=2",
        ],
        input="Ein Hund läuft.\n\nZwei Männer.\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


def run_cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.data_dir={missing}", "data directory not found"),
        ("data.src_lang=xx", "data.src_lang='xx'"),
        ("model.n_heads=3", "not divisible by model.n_heads=3"),
    ],
)
def test_bad_config_is_one_clear_line(small_overrides, tmp_path, override, message):
    args = [str(ROOT / "train.py"), *small_overrides, override.format(missing=tmp_path / "missing")]
    out = run_cli(args, tmp_path)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=nope", "Could not find 'model/nope'"),
        ("data=nope", "Could not find 'data/nope'"),
        ("run_dir={tmp}/a_file/run", "a_file/run is not writable"),
    ],
)
def test_unknown_name_or_unwritable_run_dir_is_clear(small_overrides, tmp_path, override, message):
    (tmp_path / "a_file").write_text("not a directory")
    args = [str(ROOT / "train.py"), *small_overrides, override.format(tmp=tmp_path)]
    out = run_cli(args, tmp_path)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "damage,message",
    [
        ("empty", "train.en is empty"),
        ("short", "line counts differ: {root}/multi30k/train.de has 300 lines, "),
    ],
)
def test_bad_corpus_is_one_clear_line(corpus_root, small_overrides, tmp_path, damage, message):
    root = tmp_path / "corpus"
    shutil.copytree(corpus_root, root)
    en = root / "multi30k" / "train.en"
    lines = en.read_text("utf-8").splitlines(keepends=True)
    en.write_text("" if damage == "empty" else "".join(lines[:-1]), "utf-8")
    args = [str(ROOT / "train.py"), *small_overrides, f"data.data_dir={root}"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 1
    assert message.format(root=root) in out.stderr and "Traceback" not in out.stderr


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    out = run_cli([str(ROOT / "translate.py"), f"ckpt={tmp_path}/nope.pt"], tmp_path)
    assert out.returncode == 1
    assert "checkpoint not found" in out.stderr and "Traceback" not in out.stderr


def test_translate_nbest_tsv(compose, small_overrides, tmp_path):
    train(compose(small_overrides))
    src = tmp_path / "src.txt"
    src.write_text("Ein Hund.\n\nZwei Katzen spielen.\n", "utf-8")
    out = run_cli(
        [
            str(ROOT / "translate.py"),
            f"ckpt={tmp_path}/run/checkpoints/best.pt",
            f"input={src}",
            f"output={tmp_path}/out.tsv",
            "device=cpu",
            "decode.beam_size=3",
            "decode.nbest=3",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = [r.split("\t") for r in (tmp_path / "out.tsv").read_text("utf-8").splitlines()]
    assert all(len(r) == 3 for r in rows)
    assert [r for r in rows if r[0] == "1"] == [["1", "0.0000", ""]]
    for i in ("0", "2"):
        scores = [float(r[1]) for r in rows if r[0] == i]
        assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
