"""The bench scripts' options: a bad value is argparse's one-line usage error (exit 2) that
names the option and the value, given before any data is read or any model is built (a
benchmark runs for minutes on a GPU); the command lines the GPU job and the committed
results use still parse."""

import os
import re
import shlex
import subprocess

import pytest
import torch
from test_gpu_scripts import ROOT, load_bench

from transformer.data import DataError

# What reads data, builds, measures or changes the process: a script that reaches one of
# these has started its work before rejecting the value.
WORK = ("load_batches", "load_checked", "build_model", "make_step", "apply_malloc")


def refuse(*args, **kwargs):
    raise AssertionError("the script started its work before it checked its options")


def guarded(monkeypatch, script: str, keep: tuple = ()):
    """The bench script ``script`` with ``WORK`` (but ``keep``) refused."""
    module = load_bench(script)
    for name in WORK:
        if hasattr(module, name) and name not in keep:
            monkeypatch.setattr(module, name, refuse)
    return module


def usage_error(capsys, module, args: str) -> str:
    """The one line of the usage error that ``module.main`` ends with, after its 'error: '."""
    with pytest.raises(SystemExit) as stop:
        module.main(shlex.split(args))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "Traceback" not in "\n".join(err)
    return err[-1].split(": error: ", 1)[1]


# (options, what the error says) for both scripts
BOTH = [
    ("--steps 0", "argument --steps: must be an integer >= 1, got 0"),
    ("--max-tokens 0", "argument --max-tokens: must be an integer >= 1, got 0"),
    ("--max-tokens abc", "argument --max-tokens: not an integer: 'abc'"),
    ("--device gpu", "argument --device: device=gpu: not a device torch knows"),
    ("--device cuda:99", "argument --device: "),
    ("--device meta", "argument --device: device=meta: not a device to run on"),
    (
        "--sdpa flsh",
        "argument --sdpa: unknown SDPA kernel 'flsh'; use flash, efficient, cudnn, "
        "math, several joined by +",
    ),
    ("--sdpa cudnn+eff", "argument --sdpa: unknown SDPA kernel 'eff' in 'cudnn+eff'"),
]
if not torch.cuda.is_available():
    BOTH.append(
        ("--device cuda", "argument --device: device=cuda requested but CUDA is not available")
    )
TRAIN_SPEED = [
    (
        "--configs transformer-bsae",
        "argument --configs: unknown 'transformer-bsae'; valid: multi30k-default, transformer-base",
    ),
    ("--configs multi30k-default,", "argument --configs: a blank value in 'multi30k-default,'"),
    ("--configs multi30k-default,multi30k-default", "multi30k-default given more than once"),
    ("--max-tokens 4096,abc", "argument --max-tokens: not an integer: 'abc' in '4096,abc'"),
    ("--max-tokens 4096,-1", "argument --max-tokens: must be an integer >= 1, got -1 in"),
    ("--warmup -1", "argument --warmup: must be an integer >= 0, got -1"),
    ("--packed-rows abc", "argument --packed-rows: not an integer: 'abc'"),
    ("--packed-rows 128,0", "argument --packed-rows: must be an integer >= 1, got 0 in '128,0'"),
    ("--sdpa efficient,,math", "argument --sdpa: a blank value in 'efficient,,math'"),
    ("--kinds dot,additve", "argument --kinds: unknown 'additve'; valid: scaled_dot, dot,"),
    ("--precision fp16", "argument --precision: invalid choice: 'fp16'"),
    ("--rounds 0", "argument --rounds: must be an integer >= 1, got 0"),
    ("--device cpu --rounds 3 --steps 2", "--rounds 3 is more than --steps 2"),
]
PROFILE_STEP = [
    (
        "--models ours,marain",
        "argument --models: unknown model 'marain'; use ours, marian, "
        "ours/bf16-weights or ours/rows-W (W a width >= 1)",
    ),
    ("--models ours/bf16-weight", "argument --models: unknown model 'ours/bf16-weight'"),
    ("--models ours/rows-0", "argument --models: unknown model 'ours/rows-0'"),
    ("--models ours/rows-wide", "argument --models: unknown model 'ours/rows-wide'"),
    ("--models ours,,marian", "argument --models: a blank value in 'ours,,marian'"),
    ("--top 0", "argument --top: must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(
    "script, args, said",
    [("train_speed", *case) for case in BOTH + TRAIN_SPEED]
    + [("profile_step", *case) for case in BOTH + PROFILE_STEP],
)
def test_a_bad_option_is_a_usage_error_before_any_work(monkeypatch, capsys, script, args, said):
    assert said in usage_error(capsys, guarded(monkeypatch, script), args)


@pytest.mark.parametrize("script", ["train_speed", "profile_step"])
def test_an_out_that_cannot_take_the_table_is_a_usage_error_before_any_work(
    monkeypatch, capsys, tmp_path, script
):
    """--out naming a folder failed only after the first model was measured."""
    module = guarded(monkeypatch, script)
    said = usage_error(capsys, module, f"--out {tmp_path}")
    assert said == f"argument --out: {tmp_path} is a folder; name the file to write the table to"
    (tmp_path / "table.md").write_text("")
    said = usage_error(capsys, module, f"--out {tmp_path}/table.md/new/x.md")
    assert said.endswith(f"{tmp_path / 'table.md'} is a file, not a folder")
    if os.geteuid() != 0:  # root writes in a read-only folder
        (tmp_path / "locked").mkdir(mode=0o500)
        said = usage_error(capsys, module, f"--out {tmp_path}/locked/sub/x.md")
        assert said == f"argument --out: cannot write {tmp_path}/locked/sub/x.md: Permission denied"


@pytest.mark.parametrize("script", ["train_speed", "profile_step"])
def test_a_token_budget_below_the_longest_example_is_a_usage_error_before_any_work(
    monkeypatch, capsys, script
):
    """The data's check of --max-tokens was a traceback (in train_speed, after the budgets
    listed before it had been measured)."""
    module = guarded(monkeypatch, script, keep=("load_checked",))

    def batches(max_tokens, n):  # the data's own error, as load_batches raises it
        if max_tokens < 56:
            raise DataError(f"data.max_tokens={max_tokens} is smaller than the longest example")
        return refuse() if n else ([], None)

    monkeypatch.setitem(module.load_checked.__globals__, "load_batches", batches)
    said = usage_error(capsys, module, "--max-tokens " + ("4096,50" if script == "train_speed"
                                                          else "50"))  # fmt: skip
    assert said == "--max-tokens 50: data.max_tokens=50 is smaller than the longest example"


def test_the_benchmarks_build_only_the_models_they_know():
    """Any name but "ours" built Marian, timed under the name it was given."""
    train_speed = load_bench("train_speed")
    with pytest.raises(ValueError, match="unknown model 'ours/bf16-weight': ours or marian"):
        train_speed.build_model("ours/bf16-weight", {}, 50, 0, 1, 2)


def documented_commands(tmp_path) -> list[list[str]]:
    """Every train_speed.py and profile_step.py command of scripts/gpu_bench.sh (each mode
    run with python3 and nvidia-smi stubbed: the stub records its arguments) and of the
    Markdown files (README.md, the committed results' headers)."""
    work, stubs, calls = tmp_path / "work", tmp_path / "stubs", tmp_path / "calls"
    for folder in (work, stubs):
        folder.mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    (stubs / "python3").write_text(f"#!/bin/bash\n(IFS=$'\\x1f'; echo \"$*\") >> {calls}\n")
    (stubs / "nvidia-smi").write_text("#!/bin/bash\necho NVIDIA H100 80GB HBM3\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "SKIP_INSTALL": "1",
           "OUT": str(tmp_path / "out")}  # fmt: skip
    for mode in ("next", "speed", "compile", "graphs", "eager"):
        subprocess.run(["bash", "scripts/gpu_bench.sh", mode], cwd=work, env=env,
                       check=True, capture_output=True)  # fmt: skip
    commands = [line.split("\x1f") for line in calls.read_text().splitlines()]
    pattern = re.compile(r"python3? (bench/(?:train_speed|profile_step)\.py(?: [^`|\n]*)?)")
    for md in [ROOT / "README.md", *sorted((ROOT / "results").rglob("*.md"))]:
        commands += [shlex.split(m) for m in pattern.findall(md.read_text(encoding="utf-8"))]
    return [c for c in commands if c[0] in ("bench/train_speed.py", "bench/profile_step.py")]


def test_the_documented_command_lines_still_parse(tmp_path):
    commands = documented_commands(tmp_path)
    scripts = {name: load_bench(name) for name in ("train_speed", "profile_step")}
    assert {c[0] for c in commands} == {"bench/train_speed.py", "bench/profile_step.py"}
    assert len(commands) > 15
    out = str(tmp_path / "table.md")
    for command in commands:
        args = command[1:]
        args = [out if a.endswith(".md") and "--out" in args[i - 1 : i] else a
                for i, a in enumerate(args)]  # fmt: skip
        if "--device" not in args:  # auto: a GPU here would refuse --rounds of a CPU run
            args += ["--device", "cpu"]
        module = scripts[command[0].removeprefix("bench/").removesuffix(".py")]
        ap = module.make_parser()
        got = module.parse_args(ap, args) if hasattr(module, "parse_args") else ap.parse_args(args)
        assert got.steps >= 1, command
