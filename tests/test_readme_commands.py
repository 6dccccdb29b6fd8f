"""The README's `python train.py ...` and `python translate.py ...` commands compose: every
override names a config key or option that exists, the attention kinds and decoding settings
they pick are valid, and a sweep (`-m a,b`) composes for each of its values. Nothing trains;
this keeps the examples a user copies from going stale when a key moves."""

import itertools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transformer.attention import attention_config
from transformer.translator import decode_options

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"\bpython (train|translate)\.py\b(.*)")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(config name, override list) of each train.py / translate.py command in a bash block,
    continuation lines joined, comments, redirections and pipes dropped, sweeps expanded."""
    text = (ROOT / "README.md").read_text("utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = COMMAND.search(line.split(" #")[0])
            if not m:
                continue
            words = []
            for word in shlex.split(m.group(2)):
                if word in ("<", ">", "|"):
                    break
                if "=" in word and not word.startswith(("hydra.", "-")):
                    words.append(word)
            key_values = [w.split("=", 1) for w in words]
            choices = [[f"{k}={v}" for v in v.split(",")] for k, v in key_values]
            found += [(m.group(1), list(combo)) for combo in itertools.product(*choices)]
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    names = {name for name, _ in COMMANDS}
    assert names == {"train", "translate"} and len(COMMANDS) >= 10


@pytest.mark.parametrize("name,overrides", COMMANDS, ids=[" ".join(o) for _, o in COMMANDS])
def test_readme_command_composes(compose, name, overrides):
    # run_dir defaults to Hydra's output dir, which only a running app has
    cfg = compose([*overrides, "run_dir=/tmp/unused"] if name == "train" else overrides, name=name)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    decode_options(cfg.decode)
    if name == "train" and cfg.model._target_.endswith("Transformer"):
        attention_config(OmegaConf.to_container(cfg.model.attention, resolve=True))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_passes_args_to_train_py():
    """README: `make train ARGS="trainer.max_time_minutes=60"`; make took the setting as
    one of its own variables and trained without it (make -n prints, runs nothing)."""
    out = subprocess.run(["make", "-n", "train", "ARGS=trainer.max_time_minutes=60"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    (line,) = [x for x in out.splitlines() if " train.py " in x]
    assert line.endswith(" trainer.max_time_minutes=60"), line
