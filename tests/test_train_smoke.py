"""End to end on a few hundred Multi30k pairs: train, resume, translate, bad input."""

import copy
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from transformer.data import DataError
from transformer.trainer import Trainer, TrainingError, train

ROOT = Path(__file__).resolve().parent.parent


def test_train_resume_and_translate(
    compose, small_overrides, tmp_path, logged_steps, read_csv, corpus_root
):
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
    # the run's figures: epochs and speed from the training position, the tokens trained
    # counted here from the batches (6 updates of one micro-batch each, epoch after epoch)
    progress = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["progress"]
    assert saved["steps"] == progress["step"]
    trainer = Trainer(compose(small_overrides + ["trainer.resume=false", f"run_dir={tmp_path}/x"]),
                      tmp_path / "x")  # fmt: skip
    plan = [i for e in range(progress["epoch"] + 1) for i in trainer.batcher.epoch_batches(e)]
    assert len(plan) >= 6 and progress["epoch"] == 1  # epoch 0 holds 4 batches
    # epochs trained: 1.5 (it was the index of the current epoch, 1, however far into it)
    assert saved["epochs"] == 1 + progress["batch_in_epoch"] / len(trainer.batcher.epoch_batches(1))
    plan = plan[:6]
    tokens = sum(int((trainer.batcher.batch(i).tgt_out != trainer.pad_id).sum()) for i in plan)
    assert progress["train_tokens"] == tokens
    assert saved["train_seconds"] == round(progress["train_seconds"], 1) > 0
    assert saved["train_tokens_per_s"] == round(tokens / progress["train_seconds"])
    seconds = [float(s) for (s,) in read_csv(run / "valid_log.csv", "train_seconds")]
    assert 0 < seconds[0] <= seconds[-1] <= saved["train_seconds"] and len(seconds) == 2
    n_test = len((run / "test2016.hyp").read_text("utf-8").splitlines())
    assert n_test == saved["test2016"]["sentences"]
    # valid_log.csv's greedy BLEU comes with the hypotheses it was computed from
    from transformer.metrics import bleu

    signature = (run / "valid_greedy" / "signature.txt").read_text().strip()
    assert "nrefs:1|case:mixed" in signature
    refs = (corpus_root / "multi30k" / "valid.en").read_text("utf-8").splitlines()
    scored = [(s, b) for s, b in read_csv(run / "valid_log.csv", "step", "valid_bleu") if b]
    assert scored
    for step, score in scored:
        hyps = (run / "valid_greedy" / f"step_{int(step):08d}.hyp").read_text().splitlines()
        assert round(bleu(hyps, refs)[0], 2) == float(score), step

    # Resume: a higher step limit continues from last.pt instead of starting over.
    resumed = train(compose(small_overrides + ["trainer.max_steps=9"]))
    assert resumed["steps"] == 9
    assert logged_steps(run / "valid_log.csv") == [3, 6, 9]
    # The same command once more: a finished run trains no further step.
    log_rows = (run / "train_log.csv").read_text()
    again = Trainer(compose(small_overrides + ["trainer.max_steps=9"]), run)
    assert again.run() == {"stop_reason": "already at trainer.max_steps=9"}
    assert again.step == 9 and (run / "train_log.csv").read_text() == log_rows

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
        ("data.data_dir=", "error: data.data_dir is empty"),
        # a model's ValueError (model.dropout=1.2 and decode.beam_size=0 take the same path
        # to stderr; their messages are checked in-process below)
        ("model.n_heads=3", "error: model.d_model=32 is not divisible by model.n_heads=3"),
        ("+model.foo=1", "Transformer.__init__() got an unexpected keyword argument 'foo'"),
    ],
)
def test_bad_config_is_one_clear_line(small_overrides, tmp_path, override, message):
    args = [str(ROOT / "train.py"), *small_overrides, override.format(missing=tmp_path / "missing")]
    out = run_cli(args, tmp_path)
    assert out.returncode == 1
    # the last line, and no report of Hydra's (of a model it could not make) after it
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, out.stderr[-2000:]
    assert "HYDRA_FULL_ERROR" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        # Hydra's messages were 11-12 lines ("Could not find 'model/nope'", its search path)
        ("model=nope", "error: model=nope: model has no option 'nope': name one of ['rnn', "),
        ("data=nope", "error: data=nope: data has no option 'nope': name one of ['iwslt2017', "),
        # run_dir= sets hydra.run.dir too (Hydra's files go with the run), checked first
        ("run_dir={tmp}/a_file/run", "hydra.run.dir={tmp}/a_file/run: {tmp}/a_file is a file"),
        # Hydra makes it before the task runs: a NotADirectoryError traceback from inside it
        ("hydra.run.dir={tmp}/a_file/run", "hydra.run.dir={tmp}/a_file/run: {tmp}/a_file is a "),
        # Hydra's words named neither the argument nor its key
        ("trainer.max_steps=[1,", "error: trainer.max_steps=[1,: no viable alternative at "),
    ],
)
def test_unknown_name_or_unwritable_run_dir_is_clear(small_overrides, tmp_path, override, message):
    (tmp_path / "a_file").write_text("not a directory")
    args = [str(ROOT / "train.py"), *small_overrides, override.format(tmp=tmp_path)]
    out = run_cli(args, tmp_path)
    assert out.returncode == 1
    assert message.format(tmp=tmp_path) in out.stderr and "Traceback" not in out.stderr


def test_a_run_dir_that_cannot_be_made_is_named(compose, small_overrides, tmp_path):
    """A run_dir from the config (or a sweep's, which the command line's check skips)."""
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(TrainingError, match="a_file/run is not writable: Not a directory"):
        train(compose([*small_overrides, f"run_dir={tmp_path}/a_file/run"]))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("empty", "train.en is empty"),
        ("short", "line counts differ: {root}/multi30k/train.de has 300 lines, "),
        # SentencePiece's own words were "INTERNAL: ... [!sentences_.empty()]"
        ("blank", "multi30k/train (de and en): no text to train the tokenizer on, all 600 "),
        ("short valid", "line counts differ: {root}/multi30k/valid.de has 40 lines, "),
    ],
)
def test_bad_corpus_is_one_clear_line(
    compose, corpus_root, small_overrides, tmp_path, damage, message
):
    root = tmp_path / "corpus"
    shutil.copytree(corpus_root, root)
    en = root / "multi30k" / ("valid.en" if damage == "short valid" else "train.en")
    lines = en.read_text("utf-8").splitlines(keepends=True)
    en.write_text("" if damage == "empty" else "".join(lines[:-1]), "utf-8")
    if damage == "blank":
        for lang in ("de", "en"):
            (root / "multi30k" / f"train.{lang}").write_text(" \n" * len(lines), "utf-8")
    overrides = [*small_overrides, f"data.data_dir={root}"]
    if damage == "short":  # once through train.py: the one line on stderr, no traceback
        out = run_cli([str(ROOT / "train.py"), *overrides], tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        error = out.stderr
    else:  # in-process: the start-up of a process is most of such a case's time
        with pytest.raises(DataError) as raised:
            train(compose(overrides))
        error = str(raised.value)
    assert message.format(root=root) in error
    # the corpus's fault, not the vocabulary size's (every DataError was blamed on it)
    assert "data.vocab_size" not in error
    # found before the training split is encoded (a bad valid file was found after it)
    assert not (tmp_path / "cache" / "encoded").exists()


def test_a_path_or_name_that_yaml_reads_as_a_number_is_its_digits(compose, small_overrides):
    from transformer.settings import check_data_settings

    cfg = compose(small_overrides + ["data.data_dir=2023", "data.name=123"])
    check_data_settings(cfg)  # Path(2023) failed with a TypeError traceback
    assert (cfg.data.data_dir, cfg.data.name) == ("2023", "123")
    cfg = compose(small_overrides)
    before = OmegaConf.to_yaml(cfg)
    check_data_settings(cfg)
    assert OmegaConf.to_yaml(cfg) == before  # text (and interpolations) left as they are


def test_a_corpus_of_ones_own_is_never_read_from_multi30ks_hub_dataset(compose, small_overrides):
    """``data.name=mine`` without a data folder (MT_DATA_DIR unset), or ``data.data_dir=$ROOT``
    with ROOT unset, read data=multi30k's Hub dataset, bentrevett/multi30k, as corpus
    "mine": online, the run trained on Multi30k under the other corpus's name."""
    from transformer.settings import TrainingError, check_data_settings

    with pytest.raises(TrainingError, match=r"data.data_dir is empty \(an unset variable"):
        check_data_settings(compose([*small_overrides, "data.data_dir="]))
    own = compose([*small_overrides, "data.data_dir=null", "data.name=mine"])
    with pytest.raises(
        TrainingError,
        match=r"data.name=mine, but data.data_dir is null and data.hub_name=bentrevett/multi30k "
        r"is corpus multi30k's Hub dataset: set data.data_dir to the folder that holds mine/",
    ):
        check_data_settings(own)
    for fine in (["data.name=multi30k"], ["data.name=mine", "data.hub_name=me/mine"]):
        check_data_settings(compose([*small_overrides, "data.data_dir=null", *fine]))


def test_added_keys_that_are_no_setting_are_refused_with_the_nearest_one(tmp_path):
    """Hydra's error for an unknown key suggests a +; the key was then read by nothing."""
    from transformer.cli import check_added_keys

    open_under = ("model", "decode", "trainer.optimizer", "data.hub_splits")
    conf = ROOT / "conf"
    for bad, near in (("+trainer.max_step=2", "trainer.max_steps"),
                      ("++data.max_lenght=20", "data.max_len"), ("+sed=1", "seed")):  # fmt: skip
        with pytest.raises(ValueError, match=f"is not a setting.*did you mean {near}\\?"):
            check_added_keys([bad], conf, "train", open_under)
    fine = ["++trainer.max_steps=3", "+trainer.optimizer.amsgrad=true", "+model.foo=1",
            "+data.hub_splits.test2017=test", "+hydra.job.env_set.X=1", "trainer.eval_every=2",
            "+decode.beam_size=4"]  # fmt: skip
    check_added_keys(fine, conf, "train", open_under)
    # a key only another option of a group has is a setting (a corpus's own, given to another)
    mine = tmp_path / "conf"
    (mine / "data").mkdir(parents=True)
    (mine / "main.yaml").write_text("defaults:\n  - data: a\nseed: 1\n")
    (mine / "data/a.yaml").write_text("x: 1\n")
    (mine / "data/b.yaml").write_text("y: {z: 2}\n")
    check_added_keys(["+data.y.z=3", "+data.y=4"], mine, "main")
    with pytest.raises(ValueError, match="data.z is not a setting"):
        check_added_keys(["+data.z=3"], mine, "main")
    with pytest.raises(ValueError, match="did you mean output"):
        check_added_keys(["+outptu=o.txt"], conf, "translate", ("decode",))
    for given in ("+trainer.max_step=2", "trainer.max_step=2"):  # with a +, and without one
        out = run_cli([str(ROOT / "train.py"), given], tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith(f"error: {given}: trainer.max_step is not a setting")
        assert len(out.stderr.strip().splitlines()) == 1


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    out = run_cli([str(ROOT / "translate.py"), f"ckpt={tmp_path}/nope.pt"], tmp_path)
    assert out.returncode == 1
    assert "checkpoint not found" in out.stderr and "Traceback" not in out.stderr


def test_a_folder_given_as_a_file_is_one_clear_line(tiny_ckpt, tmp_path):
    out = run_cli([str(ROOT / "translate.py"), f"ckpt={tiny_ckpt}", f"input={tmp_path}"], tmp_path)
    assert out.returncode == 1
    assert f"error: input={tmp_path}: Is a directory" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "extra,error,message",
    [
        ("ref={tmp}/ref3.txt", ValueError, r"ref3.txt has 3 lines but input=.*src2.txt has 2"),
        ("output={tmp}/no_folder/out.txt", PermissionError, "no_folder/out.txt: cannot write"),
        ("output={tmp}", IsADirectoryError, "is a folder, not a file"),
        ("decode.beam_size=0", ValueError, "decode.beam_size must be an integer >= 1, got 0"),
        ("ref={tmp}/nope.txt", DataError, "^ref=.*/nope.txt: No such file or directory$"),
        ("attention_plot={tmp}/src2.txt/pics", DataError, "attention_plot=.*: Not a directory"),
        ("device=tpu", TrainingError, "device=tpu: not a device torch knows"),
        ("output={tmp}/src2.txt", ValueError, "is the input file: it would be overwritten"),
        # torch knows them: they failed once the data was read, naming no key
        ("device=meta", TrainingError, "device=meta: not a device to run on"),
        pytest.param(
            "device=mps",
            TrainingError,
            "device=mps requested but MPS is not available",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="has MPS"),
        ),
    ],
)
def test_translate_refuses_before_loading_the_model(
    compose, tiny_ckpt, tmp_path, monkeypatch, extra, error, message
):
    """What would fail only after every line is translated (and lose the translations)."""
    from transformer import translate_cli

    monkeypatch.setattr(translate_cli, "load_for_inference", lambda *a: pytest.fail("loaded"))
    (tmp_path / "src2.txt").write_text("a\nb\n")
    (tmp_path / "ref3.txt").write_text("x\ny\nz\n")
    overrides = [f"ckpt={tiny_ckpt}", f"input={tmp_path / 'src2.txt'}", extra.format(tmp=tmp_path)]
    with pytest.raises(error, match=message):
        translate_cli.translate(compose(overrides, name="translate"), overrides=[])


def test_the_interactive_prompt_refuses_ref_and_output(compose, tiny_ckpt, tmp_path, monkeypatch):
    import sys

    from transformer import translate_cli

    monkeypatch.setattr(translate_cli, "load_for_inference", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    for extra in (f"ref={tmp_path / 'ref.txt'}", f"output={tmp_path / 'out.txt'}"):
        cfg = compose([f"ckpt={tiny_ckpt}", extra], name="translate")
        with pytest.raises(ValueError, match="need input=FILE or lines piped to stdin"):
            translate_cli.translate(cfg, overrides=[])


def test_n_best_at_the_prompt_numbers_the_inputs_across_prompts(
    compose, tiny_ckpt, monkeypatch, typed, capsys
):
    """INDEX restarted at 0 for every typed line, while the warnings counted on."""
    import sys

    from transformer import translate_cli

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    typed("Ein Hund.", "", "Zwei Kinder spielen.")
    cfg = compose([f"ckpt={tiny_ckpt}", "decode.nbest=2", "device=cpu"], name="translate")
    assert len(translate_cli.translate(cfg, overrides=[])) == 3
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert [line.split("\t")[0] for line in printed] == ["0", "0", "1", "2", "2"]


def test_an_error_message_that_introduces_its_reason_keeps_it():
    from transformer.cli import one_line

    hydra = ValueError("Error in call to target 'transformer.Transformer':\nValueError('bad')")
    assert one_line(hydra) == "Error in call to target 'transformer.Transformer': ValueError('bad')"
    state = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): a.\n\tmore")
    assert one_line(state) == "Error(s) in loading state_dict: Missing key(s): a."
    assert one_line(ValueError("one: two\nthree")) == "one: two"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x" * 500)) == "x" * 397 + "..."


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


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.joint_vocab=false", "model.share_src_tgt_embeddings=true needs data.joint_vocab"),
        ("data.test_splits=test2016", "data.test_splits must be a list of split names"),
        ("trainer.warmup_steps=0", "trainer.warmup_steps must be an integer >= 1, got 0"),
        ("trainer.log_every=0", "trainer.log_every must be an integer >= 1"),
        ("trainer.accum_steps=0", "trainer.accum_steps must be an integer >= 1"),
        ("trainer.accum_steps=true", "trainer.accum_steps must be an integer >= 1, got True"),
        ("trainer.max_nonfinite=0", "trainer.max_nonfinite must be an integer >= 1"),
        ("trainer.eval_every=1.5", "trainer.eval_every must be an integer >= 1, got 1.5"),
        ("trainer.patience=-1", "trainer.patience must be an integer >= 0"),
        ("trainer.clip_norm=0", "trainer.clip_norm must be a number > 0, got 0"),
        ("trainer.max_time_minutes=0", "trainer.max_time_minutes must be a number > 0 or null"),
        ("trainer.label_smoothing=1.5", r"trainer.label_smoothing must be a number in \[0, 1\)"),
        ("data.max_len=0", "data.max_len must be an integer >= 1, got 0"),
        ("trainer.fused_loss=maybe", "trainer.fused_loss must be auto, true or false"),
        ("trainer.cpu_malloc_reuse=2", "trainer.cpu_malloc_reuse must be true or false"),
        ("trainer.compile=maybe", "trainer.compile must be true or false, got 'maybe'"),
        ("trainer.resume=no", "trainer.resume must be true or false, got 'no'"),
        ("trainer.resume=1", "trainer.resume must be true or false, got 1"),
        ("trainer.fused_loss=0", "trainer.fused_loss must be auto, true or false, got 0"),
        ("trainer.compile_mode=fast", "trainer.compile_mode must be one of default, "),
        ("trainer.dist_backend=ncl", "trainer.dist_backend must be one of auto, gloo, nccl"),
        ("trainer.dist_timeout_minutes=0", "trainer.dist_timeout_minutes must be a number > 0"),
        ("trainer.optimizer.lr=-1", r"trainer.optimizer \(torch.optim.AdamW\): Invalid learning"),
        ("trainer.optimizer.betas=[0.9]", r"trainer.optimizer.betas must be a list of 2 numbers"),
        # failed only inside the first fused update, after the data was read, as a traceback
        ("+trainer.optimizer.amsgrad=yes", "trainer.optimizer.amsgrad must be true or false"),
        ("trainer.optimizer.weight_decay=abc", "trainer.optimizer.weight_decay must be a number"),
        ("trainer.optimizer._target_=torch.optim.Nope", "trainer.optimizer: torch.optim.Nope: "),
        ("seed=-1", r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        # torch's generators take up to 2**64 - 1: it failed in torch.manual_seed, keyless
        ("seed=18446744073709551616", r"seed must be an integer in \[0, 2\*\*64\), got 1844"),
        ("data.name=null", "data.name must be the corpus's name, got None"),
        ("data.data_dir=1.5", "data.data_dir must be a path or name, got 1.5: quote it"),
        ("data.cache_dir=[a]", "data.cache_dir must be a path or name, got"),
        ("data.vocab_size=abc", "data.vocab_size must be an integer >= 5, got 'abc'"),
        ("data.max_tokens=0", "data.max_tokens must be an integer >= 1, got 0"),
        # refused only after the training split was encoded
        ("data.mapped_budget_mb=-1", "data.mapped_budget_mb must be an integer >= 0, got -1"),
        ("data.spm_input_sentence_size=0", "data.spm_input_sentence_size must be an integer >= 1"),
        ("data.spm_model_type=bpee", "data.spm_model_type must be one of unigram, bpe, char, word"),
        ("data.character_coverage=0.9", r"data.character_coverage must be a number in \[0.98, 1\]"),
        ("data.joint_vocab=maybe", "data.joint_vocab must be true or false, got 'maybe'"),
        ("data.langs=en", "data.langs must be a list of language codes, got 'en'"),
        # `langs: [no, en]` in a YAML file (Norwegian) reads as [False, 'en']
        ("data.langs=[false,en]", "language codes .YAML reads no, yes, on and off as false or "),
        ("model.max_positions=128", "model.max_positions=128 is too small for data.max_len=128"),
        ("data.valid_split=train", "data.valid_split names the training split 'train'"),
        ("data.test_splits=[test2016,train]", "data.test_splits names the training split"),
        ("trainer.packed_rows=-1", "trainer.packed_rows must be auto or an integer >= 0, got -1"),
        ("model.attention.decoder=local", "trainer.packed_rows=64 needs the Transformer with"),
        # null where settings go: "'NoneType' object has no attribute ...", deep inside
        ("data.cache_dir=null", "data.cache_dir must name a folder .* got None"),
        ("trainer.optimizer=null", "trainer.optimizer must be a group of settings, got None"),
        ("trainer.final=null", "trainer.final must be a group of settings, got None"),
        ("data.hub_splits=5", "data.hub_splits must be a group of settings, got 5"),
    ],
)
def test_settings_that_would_fail_mid_run_fail_before_the_data_is_read(
    compose, small_overrides, tmp_path, override, message
):

    packed = ["trainer.packed_rows=64"] if "packed_rows=64" in message else []
    with pytest.raises(TrainingError, match=message):
        train(compose(small_overrides + [override, *packed]))
    assert not (tmp_path / "cache").exists()  # refused before reading the corpus


def test_a_fused_or_foreach_optimizer_setting_is_the_optimizers(compose, small_overrides, tmp_path):
    """The trainer added fused=True whatever the settings said: +trainer.optimizer.fused=false
    was overridden unseen, and foreach=true failed against it after the data was read."""
    from transformer.trainer import Trainer

    for i, (extra, fused, foreach) in enumerate(
        [([], True, None), (["fused=false"], False, None), (["foreach=true"], None, True)]
    ):
        overrides = [f"+trainer.optimizer.{e}" for e in extra]
        trainer = Trainer(compose(small_overrides + overrides), tmp_path / f"run{i}")
        group = trainer.optimizer.param_groups[0]
        assert (group["fused"], group["foreach"]) == (fused, foreach), extra
    both = ["+trainer.optimizer.fused=true", "+trainer.optimizer.foreach=true"]
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(TrainingError, match=r"trainer.optimizer \(torch.optim.AdamW\): `fused`"):
        train(compose(small_overrides + both))
    assert not (tmp_path / "cache").exists()  # refused before reading the corpus


def sgd_without_dropout(extra=()) -> list[str]:
    """Overrides for updates that can be computed by hand: plain SGD, no dropout, no
    clipping (Adam's first steps move a weight by +-lr whatever its gradient's size)."""
    return ["model.dropout=0", "model.attn_dropout=0", "model.act_dropout=0",
            "trainer.optimizer._target_=torch.optim.SGD", "trainer.optimizer.lr=0.5",
            "~trainer.optimizer.betas", "~trainer.optimizer.eps", "trainer.clip_norm=1e9",
            "trainer.final.average_last=0", "data.test_splits=[]", *extra]  # fmt: skip


def smoothed_sums(model, batches, pad: int, eps: float) -> tuple[torch.Tensor, ...]:
    """(label-smoothed loss, NLL, target tokens) summed over ``batches``, in float64 from
    the log-probabilities: per token (1 - eps) * -log p(y) + eps * mean over the vocabulary
    of -log p(v)."""
    loss = nll = torch.zeros((), dtype=torch.float64)
    ntok = 0
    for b in batches:
        logp = model(b.src, b.src_mask, b.tgt_in).double().log_softmax(-1)
        real = b.tgt_out != pad
        token_nll = -logp.gather(-1, b.tgt_out[..., None])[..., 0][real]
        uniform = -logp.mean(-1)[real]
        loss = loss + ((1 - eps) * token_nll + eps * uniform).sum()
        nll, ntok = nll + token_nll.sum(), ntok + int(real.sum())
    return loss, nll, ntok


def test_an_update_follows_the_gradient_of_the_loss_per_target_token(
    compose, small_overrides, tmp_path
):
    """Two micro-batches make one update of w - lr * grad(summed loss / target tokens of
    both), computed here by hand. Adam hid a wrong divisor: with every other test still
    passing, only an fp16 test failed when the loss was left undivided."""
    cfg = compose(small_overrides + sgd_without_dropout(["trainer.accum_steps=2"]))
    trainer = Trainer(cfg, tmp_path / "run")
    batches = [trainer.batcher.batch(i) for i in trainer.batcher.epoch_batches(0)[:2]]
    reference = copy.deepcopy(trainer.model)
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss, _, ntok = smoothed_sums(reference, batches, trainer.pad_id, cfg.trainer.label_smoothing)
    (loss / ntok).backward()
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters()}
    assert trainer.train_step(batches) is not None
    assert trainer.applied_lr == lr
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=1e-4)


def test_a_gradient_longer_than_clip_norm_is_scaled_down_to_it(compose, small_overrides, tmp_path):
    """trainer.clip_norm: a gradient of norm above it moves plain SGD's weights along the
    gradient by lr * clip_norm in all, not by lr times its norm. (Every other test of an
    update sets clip_norm=1e9: a trainer that never clipped passed them all.)"""
    clip = 0.05
    unclipped = [o for o in sgd_without_dropout() if not o.startswith("trainer.clip_norm=")]
    cfg = compose(small_overrides + unclipped + [f"trainer.clip_norm={clip}"])
    trainer = Trainer(cfg, tmp_path / "run")
    batch = trainer.batcher.batch(trainer.batcher.epoch_batches(0)[0])
    reference = copy.deepcopy(trainer.model)
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss, _, ntok = smoothed_sums(reference, [batch], trainer.pad_id, cfg.trainer.label_smoothing)
    (loss / ntok).backward()
    norm = float(torch.cat([p.grad.flatten() for p in reference.parameters()]).norm())
    assert norm > 10 * clip  # so that it clips
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train_step([batch]) is not None
    moved = torch.cat([(p.detach() - before[n]).flatten()
                       for n, p in trainer.model.named_parameters()])  # fmt: skip
    assert float(moved.norm()) == pytest.approx(lr * clip, rel=1e-3)
    for name, p in trainer.model.named_parameters():
        expected = before[name] - lr * clip / norm * dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-4)


def test_the_validation_loss_and_nll_are_per_target_token(compose, small_overrides, tmp_path):
    """valid_log.csv's valid_loss is the label-smoothed loss and valid_nll the NLL, each
    summed over the validation set and divided by its target tokens, and valid_ppl is
    exp(valid_nll): computed here in float64 for the weights the run ended with."""
    run = tmp_path / "run"
    cfg = compose(small_overrides + sgd_without_dropout([f"run_dir={run}", "trainer.max_steps=2"]))
    trainer = Trainer(cfg, run)
    trainer.run()
    with open(run / "valid_log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["step"]) == 2
    batcher = trainer.valid_batcher
    with torch.no_grad():
        loss, nll, ntok = smoothed_sums(
            trainer.model.eval(), [batcher.batch(i) for i in batcher.epoch_batches(0)],
            trainer.pad_id, cfg.trainer.label_smoothing,
        )  # fmt: skip
    assert float(last["valid_loss"]) == pytest.approx(float(loss / ntok), abs=1e-4)
    assert float(last["valid_nll"]) == pytest.approx(float(nll / ntok), abs=1e-4)
    assert float(last["valid_ppl"]) == pytest.approx(math.exp(float(nll / ntok)), abs=0.01)
    assert abs(float(loss - nll)) / ntok > 1e-3  # the two are told apart


def test_packed_rows_train_as_padded_batches(compose, small_overrides, tmp_path):
    """trainer.packed_rows lays each batch out several pairs to a row: without dropout, the
    same updates as the padded batches, to rounding (the loss is the same sum). Plain SGD
    with a large step: Adam's first steps move a weight by +-lr whatever the size of its
    gradient, so a rounding difference in a gradient near 0 flips a whole step."""
    no_dropout = sgd_without_dropout(["trainer.max_steps=3"])
    weights = []
    for width in (0, 64):
        run = tmp_path / f"run{width}"
        cfg = compose(small_overrides + no_dropout + [f"run_dir={run}",
                                                      f"trainer.packed_rows={width}"])  # fmt: skip
        trainer = Trainer(cfg, run)
        trainer.run()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    changed = 0
    for k, v in weights[0].items():
        assert torch.allclose(weights[1][k], v, atol=1e-5, rtol=1e-4), k
        changed += not torch.equal(weights[1][k], v)
    assert changed  # a different computation (else the option did nothing)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.n_heads=3", "model.d_model=32 is not divisible by model.n_heads=3"),
        ("model.dropout=1.2", r"model.dropout must be a number in \[0, 1\), got 1.2"),
        ("+model.foo=1", "got an unexpected keyword argument 'foo'"),
        ("model.attention.cross=local", "model.attention.cross='local' must be one of"),
        # the RNN's form (model=rnn model.attention=dot), given to the Transformer
        ("model.attention=dot", "model.attention='dot': the Transformer's attention is a group"),
    ],
)
def test_model_settings_fail_before_the_data_is_read(
    compose, small_overrides, tmp_path, override, message
):
    """The model refused them only when built, after a fresh run had trained its tokenizer
    and encoded the corpus (13 s of Multi30k)."""
    with pytest.raises(ValueError, match=message):
        train(compose(small_overrides + [override]))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.attention.window=4"], "model.attention.window=4 is for local attention, "
         "which no role uses (encoder=scaled_dot, decoder=scaled_dot, cross=scaled_dot)"),
        (["model.attention.kind=local", "model.attention.stride=4"],
         "model.attention.stride=4 is for sparse attention"),
        (["model.attention.kind=sparse", "model.attention.summary=2"],
         "model.attention.summary=2 is for the fixed sparse pattern"),
        # an encoder's linear attention is not causal: it has no chunks
        (["model.attention.encoder=linear", "model.attention.chunk=16"],
         "model.attention.chunk=16 is for linear decoder self-attention"),
        (["model.attention.kind=linear", "model.attention.encoder=local",
          "model.attention.decoder=sparse"], "model.attention.kind=linear sets no role"),
    ],
)  # fmt: skip
def test_attention_settings_no_role_reads_fail_before_the_data_is_read(
    compose, small_overrides, tmp_path, overrides, message
):
    """A window without local attention (and the like) trained full attention, silently."""
    with pytest.raises(TrainingError, match=re.escape(message)):
        train(compose(small_overrides + overrides))
    assert not (tmp_path / "cache").exists()


def test_a_run_trained_with_an_unread_attention_setting_resumes(
    compose, small_overrides, tmp_path, monkeypatch
):
    """Refused for a new run; one that trained with it before it was refused resumes."""
    from transformer import trainer

    cfg = compose(small_overrides + ["model.attention.window=4", "trainer.max_steps=3"])
    monkeypatch.setattr(trainer, "ignored_options", lambda cfg: [])
    (tmp_path / "old").mkdir()
    trainer.Trainer(cfg, tmp_path / "old").run()
    monkeypatch.undo()
    assert trainer.Trainer(cfg, tmp_path / "old").resume_from is not None
    (tmp_path / "new").mkdir()
    with pytest.raises(TrainingError, match="model.attention.window=4 is for local attention"):
        trainer.Trainer(cfg, tmp_path / "new")


def test_torchrun_settings_fail_before_the_process_group_is_joined(
    compose, small_overrides, monkeypatch
):
    """Under torchrun a misspelt backend failed inside torch's init_process_group."""
    from transformer import distributed

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "init", lambda *a: pytest.fail("joined the group first"))
    with pytest.raises(TrainingError, match="trainer.dist_backend must be one of auto, "):
        train(compose(small_overrides + ["trainer.dist_backend=ncl"]))


def test_decode_settings_fail_before_the_data_is_read(compose, small_overrides, tmp_path):
    """Not at the first BLEU evaluation, after the first updates (and not beam_size=0 decoded
    greedily without a word)."""
    with pytest.raises(ValueError, match="decode.beam_size must be an integer >= 1, got 0"):
        train(compose(small_overrides + ["decode.beam_size=0"]))
    # 5-best lists, fine at beam 5, not at the beam of 2 tried among the final choices:
    # named by the setting that tries it (it named decode.beam_size alone, which is 5)
    final = ["decode.nbest=5", "trainer.final.beam_sizes=[2]"]
    message = "trainer.final: the final choice's beam size 2 with length penalty 0.6: decode"
    with pytest.raises(TrainingError, match=f"{message}.nbest=5 exceeds decode.beam_size=2"):
        train(compose(small_overrides + final))
    assert not (tmp_path / "cache").exists()


def test_a_model_with_just_enough_positions_trains_and_translates(
    compose, small_overrides, tmp_path, corpus_root, read_csv
):
    """max_positions = data.max_len + 1: validation targets longer than that (cut for the
    loss) and output length limits beyond it (capped) both failed mid-run."""
    tight = ["model.max_positions=13", "data.max_len=12", "trainer.max_steps=3"]
    metrics = train(compose(small_overrides + tight + ["decode.max_len_b=40"]))
    assert metrics["steps"] == 3
    [(loss, bleu)] = read_csv(tmp_path / "run" / "valid_log.csv", "valid_loss", "valid_bleu")
    assert math.isfinite(float(loss)) and bleu != ""  # validation loss and BLEU both ran
    hyps = (tmp_path / "run" / "test2016.hyp").read_text("utf-8").splitlines()
    sources = (corpus_root / "multi30k" / "test2016.de").read_text("utf-8").splitlines()
    assert len(hyps) == len(sources)


def test_a_vocabulary_size_the_corpus_cannot_fill(compose, small_overrides, tmp_path, caplog):
    """Too few pieces for the corpus's characters is an error naming data.vocab_size; more
    than its sample supports trains a smaller vocabulary, with a warning saying so."""
    from transformer.run_data import prepare_data

    with pytest.raises(TrainingError, match="^data.vocab_size=5: SentencePiece cannot train 5"):
        prepare_data(compose(small_overrides + ["data.vocab_size=5"]), tmp_path / "run")
    tok = prepare_data(compose(small_overrides + ["data.vocab_size=50000"]), tmp_path / "run")[1]
    assert len(tok) < 50000
    assert f"joint.model has {len(tok)} pieces, fewer than data.vocab_size=50000" in caplog.text


def test_separate_vocabularies_train_with_their_own_embeddings(compose, small_overrides, tmp_path):
    separate = ["data.joint_vocab=false", "model.share_src_tgt_embeddings=false"]
    metrics = train(compose(small_overrides + separate + ["trainer.max_steps=2"]))
    run = tmp_path / "run"
    assert metrics["steps"] == 2
    assert sorted(p.name for p in (run / "tokenizer").iterdir()) == ["de.model", "en.model"]
    model = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(model["src_embed.weight"], model["tgt_embed.weight"])


def test_a_fresh_start_refuses_another_runs_checkpoints_and_drops_stale_log_rows(
    compose, small_overrides, tmp_path, logged_steps
):

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_50.pt").write_bytes(b"an older run's")
    with pytest.raises(TrainingError, match="trainer.resume=false but .* holds another run's"):
        train(compose(small_overrides + ["trainer.resume=false"]))
    # A run that stopped before its first checkpoint leaves log rows but nothing to resume
    # from: the next run starts at step 0 and drops them.
    (run / "checkpoints" / "step_50.pt").unlink()
    (run / "train_log.csv").write_text("step,epoch,loss,lr,tokens_per_s,pad_frac\n40,0,9,0,1,0\n")
    train(compose(small_overrides))
    assert logged_steps(run / "train_log.csv") == [2, 4, 6]


def test_tokens_per_s_leaves_out_validation_time(compose, small_overrides, monkeypatch):
    """By the clock the trainer reads, every update takes 10 s and the validation after
    step 3 1000 s: train_log.csv's window over steps 3-4 and the training time (which
    trainer.max_time_minutes limits) count the updates' 10 s each and leave the validation
    out. (A real sleep of 3 s in the validation bounded the updates' own time, which a
    loaded machine passed, and could not see a window that lost the time before it.)"""
    import time
    from types import SimpleNamespace

    from transformer import train_log
    from transformer import trainer as trainer_module
    from transformer.trainer import Trainer

    evaluate, log_window, step = Trainer.maybe_evaluate, Trainer.log_window, Trainer.train_step
    added = [0.0]  # the seconds the slow updates and validation added to the clock
    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + added[0])
    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(train_log, "time", clock)

    def slow_update(self, micro_batches, packed=None):
        added[0] += 10.0
        return step(self, micro_batches, packed)

    def slow_evaluation(self, valid_log, out_of_time):
        if self.step == 3:  # trainer=debug: logs at steps 2, 4, 6; validates at 3 and 6
            added[0] += 1000.0
        return evaluate(self, valid_log, out_of_time)

    seconds, tokens = {}, {}

    def logged(self, train_log, bar, window):
        seconds[self.step] = window.elapsed()  # the time tokens_per_s divides by
        tokens[self.step] = window.tokens
        return log_window(self, train_log, bar, window)

    monkeypatch.setattr(Trainer, "train_step", slow_update)
    monkeypatch.setattr(Trainer, "maybe_evaluate", slow_evaluation)
    monkeypatch.setattr(Trainer, "log_window", logged)
    cfg = compose(small_overrides)
    metrics = train(cfg)
    assert sorted(seconds) == [2, 4, 6]
    for logged_seconds in seconds.values():  # two updates each, without the validation
        assert 20 <= logged_seconds < 1000, seconds
    assert 60 <= metrics["train_seconds"] < 1000, metrics["train_seconds"]  # six updates
    # the row divides the window's tokens by its seconds (read just before the row is made)
    with open(Path(cfg.run_dir) / "train_log.csv") as f:
        written = {int(r["step"]): int(r["tokens_per_s"]) for r in csv.DictReader(f)}
    for step in (2, 4, 6):
        assert written[step] == pytest.approx(tokens[step] / seconds[step], rel=0.05), step


def test_a_log_window_counts_its_running_time_across_pauses(monkeypatch):
    """An evaluation pauses the train_log.csv window: the seconds it ran before the pause
    count with those after it, and so do those a checkpoint kept it with (a window that
    restarted its clock divided its tokens by the time since the last evaluation only)."""
    from types import SimpleNamespace

    from transformer import train_log

    now = [100.0]
    monkeypatch.setattr(train_log, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    window = train_log.LogWindow().start()
    now[0] += 2.0
    window.pause()
    now[0] += 30.0  # the evaluation
    assert window.elapsed() == 2.0
    window.start()
    now[0] += 1.0
    assert window.elapsed() == 3.0
    resumed = train_log.LogWindow(seconds=window.elapsed()).start()  # as a resume makes it
    now[0] += 0.5
    assert resumed.elapsed() == 3.5


def test_the_trial_build_imports_the_models_module_off_the_meta_device(tmp_path, monkeypatch):
    """A tensor a module makes as it is imported must not become a meta tensor because the
    module was first imported by the trial build (trainer: model settings checked early)."""
    import sys

    import torch
    from omegaconf import OmegaConf

    from transformer.translator import trial_build

    (tmp_path / "made_on_import.py").write_text(
        "import torch\n"
        "TABLE = torch.arange(4)\n"
        "class Model(torch.nn.Module):\n"
        "    def __init__(self, src_vocab_size, tgt_vocab_size, pad_id, width=2):\n"
        "        super().__init__()\n"
        "        if width < 1:\n"
        "            raise ValueError(f'model.width must be >= 1, got {width}')\n"
        "        self.emb = torch.nn.Embedding(src_vocab_size, width)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "made_on_import", raising=False)
    with pytest.raises(ValueError, match="model.width must be >= 1, got 0"):
        trial_build(OmegaConf.create({"_target_": "made_on_import.Model", "width": 0}))
    assert sys.modules["made_on_import"].TABLE.device == torch.device("cpu")
    trial_build(OmegaConf.create({"_target_": "made_on_import.Model"}))
