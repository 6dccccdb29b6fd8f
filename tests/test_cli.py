"""The entry points' error reporting (transformer/cli.py): expected faults end in one line."""

import errno
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from transformer.cli import friendly_errors, override_error, run_dir_is_hydras, unwritable_run_dir


def fails_with(error):
    @friendly_errors
    def task():
        raise error

    return task


def test_an_expected_error_is_one_line_and_status_1(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ConfigAttributeError) as missing:
        OmegaConf.create({"data": {}}).data.nope  # noqa: B018
    for error in (missing.value, ValueError("data.max_len=-1 must be positive\nmore detail")):
        with pytest.raises(SystemExit) as stop:
            fails_with(error)()
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "must be positive" in err and "more detail" not in err


def test_a_write_the_machine_refuses_names_the_file(capsys, monkeypatch):
    """A full disk or a file size limit anywhere (here: copying the tokenizer into the run)
    was a traceback; other OSErrors keep theirs."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    copy = OSError(errno.EFBIG, "File too large", "/cache/spm.model", None, "/run/joint.model")
    for error, message in (
        (copy, "error: cannot write /run/joint.model: File too large\n"),
        (OSError(errno.ENOSPC, "No space left on device", "/run/log"), "/run/log: No space "),
    ):
        with pytest.raises(SystemExit) as stop:
            fails_with(error)()
        assert stop.value.code == 1 and message in capsys.readouterr().err
    with pytest.raises(OSError, match="Input/output error"):
        fails_with(OSError(errno.EIO, "Input/output error"))()


def test_hydra_full_error_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="bad value"):
        fails_with(ValueError("bad value"))()


def test_a_bug_keeps_its_traceback_and_ctrl_c_is_status_130(capsys):
    with pytest.raises(ZeroDivisionError):
        fails_with(ZeroDivisionError("a bug"))()
    with pytest.raises(SystemExit) as stop:
        fails_with(KeyboardInterrupt())()
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(SystemExit) as stop:  # the trainer's, as README quotes it
        fails_with(KeyboardInterrupt("interrupted at step 4; last.pt saved in R"))()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted at step 4; last.pt saved in R\n"


def test_the_entry_points_start_without_importing_the_compiler():
    """torch._dynamo takes 1.5 s to import; a decorator on the fused loss once imported it
    with the trainer, before train.py could check its config (loss.eager_under_compile)."""
    import subprocess
    import sys

    code = (
        "import sys, transformer.trainer, transformer.translate_cli;"
        "print('torch._dynamo' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_an_override_hydra_cannot_parse_is_named():
    """Hydra printed only the text it stopped at: "missing EQUAL at '<EOF>'"."""
    assert override_error(["a=1", "trainer.lr"]).startswith("trainer.lr: missing EQUAL")
    assert override_error(["x=(", "y=1"]).startswith("x=(: extraneous input '('")
    # flags, their values, sweeps, deletions, quoted and interpolated values all parse
    good = ["--cfg", "job", "-cn", "train", "--info", "defaults", "-m", "trainer.lr=1e-3,2e-3",
            "~data.max_len", "+x='a b'", "run_dir=${hydra:runtime.cwd}/r",
            "--info", "y=[1,2]"]  # fmt: skip
    assert override_error(good) is None
    assert override_error(["--info", "z=[1,"]).startswith("z=[1,: ")


def test_a_config_group_set_to_null_is_named_with_its_options():
    """Hydra raised "Config group override must be a string or a list. Got NoneType" from
    deep inside, as a traceback."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    assert override_error(["trainer=null"], conf) == (
        "trainer=null: trainer is a config group: name one of ['debug', 'default']"
    )
    assert override_error(["~trainer", "trainer.final=null", "x=null"], conf) is None


def test_an_unknown_option_or_setting_is_named_before_hydra_composes():
    """Hydra's messages for a misspelt key (without +) or an option a config group lacks
    were 6-12 lines, and for the key it advised a + that then added a setting nothing reads."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    train = ("model", "decode", "trainer.optimizer", "data.hub_splits")  # train.py's OPEN_UNDER
    assert override_error(["model=foo"], conf) == (
        "model=foo: model has no option 'foo': name one of ['rnn', 'transformer']"
    )
    assert override_error(["-m", "model=transformer,rnn2"], conf).startswith(
        "model=transformer,rnn2: model has no option 'rnn2'"
    )
    assert override_error(["trainer.max_step=20"], conf, "train", train) == (
        "trainer.max_step=20: trainer.max_step is not a setting (did you mean "
        "trainer.max_steps? --cfg job prints every setting)"
    )
    assert override_error(["model.dmodel=3"], conf, "train", train) == (
        "model.dmodel=3: model.dmodel is not a setting (did you mean model.d_model? "
        "+model.dmodel=3 adds a keyword argument; --cfg job prints every setting)"
    )
    assert "did you mean input?" in override_error(["inptu=a"], conf, "translate", ("decode",))
    assert override_error(["~data.foo"], conf, "train").startswith("~data.foo: data.foo is not")
    # settings, other options' settings, additions (check_added_keys'), Hydra's, group paths
    fine = ["-m", "model=transformer,rnn", "data=wmt14", "trainer.max_steps=3",
            "model.hidden_size=8", "+trainer.optimizer.amsgrad=true", "++x=1", "~data.max_len",
            "hydra.job.chdir=false", "trainer/model@trainer=rnn", "decode=greedy",
            "model=glob(*)", "data=${oc.env:DATA}"]  # fmt: skip
    assert override_error(fine, conf, "train", train) is None


def test_a_setting_of_another_option_is_named_with_the_option_that_has_it():
    """model.hidden_size=3 with the Transformer (a key only model=rnn has) got Hydra's
    6-line block advising a + that then fails inside the model; a sweep composes the
    default option first, so it fails there even when every swept option has the key."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    train = ("model", "decode", "trainer.optimizer", "data.hub_splits")  # train.py's OPEN_UNDER
    assert override_error(["model.hidden_size=3"], conf, "train", train) == (
        "model.hidden_size=3: model.hidden_size is a setting of model=rnn only, not of "
        "model=transformer (--cfg job prints every setting)"
    )
    assert override_error(["model.d_model=8", "model=rnn"], conf, "train", train).startswith(
        "model.d_model=8: model.d_model is a setting of model=transformer only, not of model=rnn"
    )
    # an option the group lacks is named as such, even after a key of the default option
    assert override_error(["model.d_model=3", "model=nope"], conf, "train", train).startswith(
        "model=nope: model has no option 'nope'"
    )
    swept = override_error(["-m", "model=rnn,rnn", "model.hidden_size=3"], conf, "train", train)
    assert "not of model=transformer, which this sweep composes" in swept
    # decode/sample.yaml takes greedy.yaml's keys in, and translate.py has a decode group too
    assert override_error(["decode.top_p=0.5"], conf, "translate", ("decode",)) is None
    assert override_error(["decode=greedy", "decode.beam_size=2"], conf, "train", train) is None
    fine = [["model=rnn", "model.hidden_size=3"], ["-m", "model=rnn", "model.hidden_size=3"],
            ["trainer.optimizer.lr=1e-3", "model=rnn"], ["model=glob(*)", "model.hidden_size=3"],
            ["model=${oc.env:M}", "model.hidden_size=3"]]  # fmt: skip
    for argv in fine:
        assert override_error(argv, conf, "train", train) is None, argv


def test_a_sweep_gives_every_job_a_folder_of_its_own():
    """A sweep over anything but model put every job in one folder (the sweep's subdir was
    the model's name), and so did run_dir= with -m: each job resumed the run of the one
    before, trained nothing once it had finished, and rewrote its config and results."""
    from omegaconf import OmegaConf

    from transformer.cli import shared_sweep_run_dir

    train_yaml = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "train.yaml")
    subdir = OmegaConf.to_container(train_yaml.hydra.sweep)["subdir"]  # (unresolved)
    assert "${hydra.job.num}" in subdir
    refused = shared_sweep_run_dir(["-m", "trainer.optimizer.lr=1e-3,5e-3", "run_dir=/r"])
    assert refused.startswith("run_dir=/r with -m is one folder for every job of the sweep")
    for fine in (["run_dir=/r"], ["-m", "run_dir=/a,/b"], ["-m", "run_dir=/r/${seed}"],
                 ["-m", "model=rnn,transformer"]):  # fmt: skip
        assert shared_sweep_run_dir(fine) is None, fine


def test_run_dir_takes_hydras_files_along(compose):
    """run_dir=X put checkpoints and logs in X but train.log and .hydra/ in a new folder
    under outputs/: it now also sets hydra.run.dir, unless given or in a sweep."""
    assert run_dir_is_hydras(["a=1", "run_dir=/r"]) == ["a=1", "run_dir=/r", "hydra.run.dir=/r"]
    for kept in (["run_dir=/r", "hydra.run.dir=/h"], ["-m", "run_dir=/r"], ["a=1"],
                 ["run_dir=${hydra:runtime.cwd}/r"]):  # fmt: skip
        assert run_dir_is_hydras(kept) == kept
    # given twice, the config takes the last: so do Hydra's files
    twice = ["run_dir=/a", "run_dir=/b"]
    assert compose(twice).run_dir == "/b" and run_dir_is_hydras(twice)[-1] == "hydra.run.dir=/b"


def test_a_run_dir_the_file_system_refuses_is_named(tmp_path):
    """os.access lets root through where the file system will not (/proc): Hydra's mkdir
    then failed as a traceback."""
    assert unwritable_run_dir(["hydra.run.dir=/proc/nope/run"]).startswith(
        "hydra.run.dir=/proc/nope/run: cannot create"
    )
    assert unwritable_run_dir([f"hydra.run.dir={tmp_path}/new/run"]) is None


def test_a_group_the_command_does_not_compose_is_one_line_naming_its_groups():
    """translate.py model=rnn got Hydra's 3 lines advising +model=rnn, which then failed
    another way; and a misspelt decode.* key was told that a + adds a keyword argument,
    which decoding takes none of."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    assert override_error(["model=rnn"], conf, "translate", ("decode",)) == (
        "model=rnn: translate.py takes no model= (its config groups: decode)"
    )
    train = ("model", "decode", "trainer.optimizer", "data.hub_splits")
    typo = override_error(["decode.beamsize=3"], conf, "train", train)
    assert "did you mean decode.beam_size?" in typo and "adds a keyword argument" not in typo
    assert "+model.foo=1 adds a keyword argument" in override_error(
        ["model.foo=1"], conf, "train", train
    )
