"""The entry points' error reporting (transformer/cli.py): expected faults end in one line."""

import errno
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from transformer.cli import friendly_errors, unparsable_override


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
    assert unparsable_override(["a=1", "trainer.lr"]).startswith("trainer.lr: missing EQUAL")
    assert unparsable_override(["x=(", "y=1"]).startswith("x=(: extraneous input '('")
    # flags, their values, sweeps, deletions, quoted and interpolated values all parse
    good = ["--cfg", "job", "-cn", "train", "--info", "defaults", "-m", "trainer.lr=1e-3,2e-3",
            "~data.max_len", "+x='a b'", "run_dir=${hydra:runtime.cwd}/r",
            "--info", "y=[1,2]"]  # fmt: skip
    assert unparsable_override(good) is None
    assert unparsable_override(["--info", "z=[1,"]).startswith("z=[1,: ")


def test_a_config_group_set_to_null_is_named_with_its_options():
    """Hydra raised "Config group override must be a string or a list. Got NoneType" from
    deep inside, as a traceback."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    assert unparsable_override(["trainer=null"], conf) == (
        "trainer=null: trainer is a config group: name one of ['debug', 'default']"
    )
    assert unparsable_override(["~trainer", "trainer.final=null", "x=null"], conf) is None
