"""The bench scripts' options: a bad value is argparse's one-line usage error (exit 2) that
names the option and the value, given before any data is read or any model is built (a
benchmark runs for minutes on a GPU); the command lines the GPU job and the committed
results use still parse."""

import os
import re
import shlex
import subprocess
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_gpu_scripts import ROOT, load_bench

from transformer import dropout
from transformer.data import DataError

# What reads data, builds, measures or changes the process in one bench script or another:
# a script that reaches one of these has started its work before rejecting the value.
WORK = ("load_batches", "load_checked", "build_model", "make_step", "apply_malloc", "load_split",
        "count_ops", "time_steps", "build", "reuse_freed_memory", "median_ms", "load_model",
        "uptime", "compose", "default_overhead", "main_gpu", "make_corpus", "watch",
        "train_once")  # fmt: skip


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


# Options that count something, by script: at least 1 (0 is an error), or at least 0
AT_LEAST_ONE = {
    "train_speed": "--steps --max-tokens --packed-rows --rounds --join",
    "profile_step": "--steps --max-tokens --top --join",
    "attention_kernels": "--repeats --batches --max-tokens",
    "collate_time": "--rounds --max-tokens",
    "dropout_masks": "--reps",
    "host_overhead": "--steps --rounds --top",
    "packed_fill": "--batches --repeats --widths --max-tokens --join",
    "step_flops": "--steps --max-tokens --join",
    "update_time": "--calls --rounds",
    "decode_speed": "--threads --limit --length",
    "attention_claims": "--repeats",
    "data_scale": "--num-proc --sizes",
    "data_workers": "--rounds --steps",
}
AT_LEAST_ZERO = {"train_speed": "--warmup", "step_flops": "--warmup",
                 "packed_fill": "--open-rows", "attention_claims": "--threads"}  # fmt: skip
WITH_DEVICE = ("train_speed", "profile_step", "attention_kernels", "decode_speed",
               "attention_claims")  # fmt: skip
WITH_OUT_FILE = ("train_speed", "profile_step", "attention_kernels", "collate_time",
                 "dropout_masks", "host_overhead", "packed_fill", "step_flops", "update_time",
                 "decode_speed", "data_workers")  # fmt: skip
SDPA = "use flash, efficient, cudnn, math, several joined by +"
CASES = [
    *[(script, f"{option} 0", f"argument {option}: must be an integer >= 1, got 0")
      for script, options in AT_LEAST_ONE.items() for option in options.split()],
    *[(script, f"{option} -1", f"argument {option}: must be an integer >= 0, got -1")
      for script, options in AT_LEAST_ZERO.items() for option in options.split()],
    *[(script, "--device gpu", "argument --device: device=gpu: not a device torch knows")
      for script in WITH_DEVICE],
    *[(script, "--out {folder}",
       "argument --out: {folder} is a folder; name the file to write the results to")
      for script in WITH_OUT_FILE],
    *[(script, f"{option} {{file}}",
       f"argument {option}: {{file}} is a file; name the folder to write the results to")
      for script, option in [("attention_claims", "--out"), ("data_scale", "--out"),
                             ("data_scale", "--work")]],
    *[(script, args, said) for script in ("train_speed", "profile_step") for args, said in [
        ("--max-tokens abc", "argument --max-tokens: not an integer: 'abc'"),
        ("--device cuda:99", "argument --device: device=cuda:99"),
        ("--device meta", "argument --device: device=meta: not a device to run on"),
        ("--sdpa flsh", f"argument --sdpa: unknown SDPA kernel 'flsh'; {SDPA}"),
        ("--sdpa cudnn+eff", "argument --sdpa: unknown SDPA kernel 'eff' in 'cudnn+eff'"),
    ]],
]  # fmt: skip
if not torch.cuda.is_available():
    said = "argument --device: device=cuda requested but CUDA is not available"
    CASES += [(script, "--device cuda", said) for script in WITH_DEVICE]
# script | options | what the error says (a line ending in a backslash goes on)
CASES += [
    tuple(cell.strip() for cell in case.split(" | "))
    for case in """
train_speed | --configs transformer-bsae | argument --configs: unknown 'transformer-bsae'; valid: \
multi30k-default, transformer-base
train_speed | --configs multi30k-default, | a blank value in 'multi30k-default,'
train_speed | --configs multi30k-default,multi30k-default | multi30k-default given more than once
train_speed | --max-tokens 4096,abc | argument --max-tokens: not an integer: 'abc' in '4096,abc'
train_speed | --packed-rows abc | argument --packed-rows: not an integer: 'abc'
train_speed | --packed-rows 128,0 | --packed-rows: must be an integer >= 1, got 0 in '128,0'
train_speed | --sdpa efficient,,math | argument --sdpa: a blank value in 'efficient,,math'
train_speed | --kinds dot,additve | argument --kinds: unknown 'additve'; valid: scaled_dot, dot,
train_speed | --precision fp16 | argument --precision: invalid choice: 'fp16'
train_speed | --device cpu --rounds 3 --steps 2 | --rounds 3 is more than --steps 2
train_speed | --join 0 | argument --join: must be an integer >= 1, got 0
step_flops | --join two | argument --join: not an integer: 'two'
train_speed | --rounds 2 --compile --compile-mode reduce-overhead | --rounds must be 1 with \
--compile-mode reduce-overhead (CUDA graphs)
profile_step | --models ours,marain | argument --models: unknown model 'marain'; use ours, \
marian, ours/bf16-weights or ours/rows-W[/bf16-weights] (W a width >= 1)
profile_step | --models ours/bf16-weight | argument --models: unknown model 'ours/bf16-weight'
profile_step | --models ours/rows-0 | argument --models: unknown model 'ours/rows-0'
profile_step | --models ours/rows-wide | argument --models: unknown model 'ours/rows-wide'
profile_step | --models ours/rows-0/bf16-weights | argument --models: unknown model 'ours/rows-0/b
profile_step | --models ours/rows-64/bf16 | argument --models: unknown model 'ours/rows-64/bf16'
profile_step | --models ours,,marian | argument --models: a blank value in 'ours,,marian'
attention_kernels | --methods 'cudnn,rows 0 math' | argument --methods: unknown method \
'rows 0 math'; use cudnn, efficient, flash, math, nested flash
attention_kernels | --methods cudnn,flsh | argument --methods: unknown method 'flsh'
host_overhead | --configs base | argument --configs: unknown 'base'; valid: multi30k-default
packed_fill | --max-tokens 4096,x | argument --max-tokens: not an integer: 'x' in '4096,x'
step_flops | --configs transformer-big | argument --configs: unknown 'transformer-big'
step_flops | --mfu 0 | argument --mfu: must be a number > 0 and <= 1, got 0
step_flops | --mfu 35 | argument --mfu: must be a number > 0 and <= 1, got 35
step_flops | --mfu nan | argument --mfu: must be a number > 0 and <= 1, got nan
update_time | --configs base | argument --configs: unknown 'base'
decode_speed | --models transformer,rnns | argument --models: unknown 'rnns'; valid: \
transformer, rnn
decode_speed | --ckpt {folder} | argument --ckpt: {folder} is a folder; name a file in it
decode_speed | --rnn-ckpt {folder}/nope.pt | argument --rnn-ckpt: {folder}/nope.pt: no such file
decode_speed | --baseline HEAD | --baseline needs --ckpt or --rnn-ckpt of a model in --models
decode_speed | --models rnn --ckpt {file} --baseline HEAD | --baseline needs --ckpt or --rnn-ckpt
decode_speed | --ckpt {file} --baseline no-such-ref | --baseline no-such-ref: no such commit in
attention_claims | --budget-s 0 | argument --budget-s: must be a number > 0, got 0
data_scale | --steps 1 | argument --steps: must be an integer >= 2, got 1
""".strip().splitlines()
]


@pytest.mark.parametrize("script, args, said", CASES)
def test_a_bad_option_is_a_usage_error_before_any_work(
    monkeypatch, capsys, tmp_path, script, args, said
):
    """Counts of 0 gave empty tables (or profiled the warm-up batches), unknown names were
    measured as something else or failed after the names before them were measured, an
    --out that was a folder (a file, for a folder of results) failed once the results were
    written. {folder} in a case is a folder, {file} a file."""
    where = {"folder": tmp_path, "file": tmp_path / "table.md"}
    where["file"].write_text("")
    module = guarded(monkeypatch, script)
    assert said.format(**where) in usage_error(capsys, module, args.format(**where))


@pytest.mark.parametrize("script", ["train_speed", "profile_step"])
def test_an_out_that_cannot_be_written_is_a_usage_error_before_any_work(
    monkeypatch, capsys, tmp_path, script
):
    """An --out below a file, or in a folder this process may not write in, failed only
    after the first model was measured."""
    module = guarded(monkeypatch, script)
    (tmp_path / "table.md").write_text("")
    below = f"{tmp_path}/table.md/new/x.md"
    said = usage_error(capsys, module, f"--out {below}")
    assert said == f"argument --out: {below}: {tmp_path}/table.md is a file, not a folder"
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write there: the probe's file is refused instead

        def refused(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    said = usage_error(capsys, module, f"--out {tmp_path}/locked/sub/x.md")
    assert said == f"argument --out: cannot write {tmp_path}/locked/sub/x.md: Permission denied"


@pytest.mark.parametrize("script", ["train_speed", "profile_step"])
def test_a_token_budget_below_the_longest_example_is_a_usage_error_before_any_work(
    monkeypatch, capsys, script
):
    """The data's check of --max-tokens was a traceback (in train_speed, after the budgets
    listed before it had been measured)."""
    module = guarded(monkeypatch, script, keep=("load_checked",))

    def batches(max_tokens, n, join=1):  # the data's own error, as load_batches raises it
        if max_tokens < 56:
            raise DataError(f"--max-tokens={max_tokens} is smaller than the longest example")
        return refuse() if n else ([], None)

    monkeypatch.setitem(module.load_checked.__globals__, "load_batches", batches)
    budgets = {"train_speed": "4096,50", "profile_step": "50"}[script]
    said = usage_error(capsys, module, f"--max-tokens {budgets}")
    assert said == "--max-tokens=50 is smaller than the longest example"


def test_collate_time_checks_each_token_budget_against_the_data_before_timing(monkeypatch, capsys):
    module = guarded(monkeypatch, "collate_time")
    split = SimpleNamespace(src_lens=np.array([20, 55]), tgt_lens=np.array([40, 30]))
    monkeypatch.setattr(module, "load_split", lambda: (split, (0, 1, 2)))
    monkeypatch.setattr(module, "collate", refuse)
    said = usage_error(capsys, module, "--max-tokens 4096 50")
    assert said == ("--max-tokens=50 is smaller than the longest example (56 tokens); raise it")


def test_train_speed_refuses_a_model_its_options_do_not_make_before_any_work(monkeypatch, capsys):
    """--models names rows of the table; a name the other options do not make (here: rows
    in bf16-weights without --bf16-weights) is a usage error listing those they do."""
    module = guarded(monkeypatch, "train_speed")

    class Tok:
        pad_id, bos_id, eos_id = 0, 1, 2

        def __len__(self):
            return 50

    monkeypatch.setattr(module, "load_checked", lambda *args: ([], Tok()))
    said = usage_error(
        capsys, module, "--device cpu --configs multi30k-default --max-tokens 4096 "
        "--packed-rows 128 --models ours/rows-128/bf16-weights,marian",
    )  # fmt: skip
    assert said == (
        "--models: ours/rows-128/bf16-weights not among the models these options make: "
        "marian, ours, ours/rows-128"
    )


def test_the_benchmarks_build_only_the_models_they_know():
    """Any name but "ours" built Marian, timed under the name it was given."""
    train_speed = load_bench("train_speed")
    with pytest.raises(ValueError, match="unknown model 'ours/bf16-weight': ours or marian"):
        train_speed.build_model("ours/bf16-weight", {}, 50, 0, 1, 2)


def documented_commands(tmp_path) -> list[list[str]]:
    """Every bench script's command in scripts/gpu_bench.sh (each mode run with python3 and
    nvidia-smi stubbed: the stub records its arguments) and in the Markdown files (README.md,
    docs/, the committed results' headers)."""
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
    for mode in (
        "next",
        "joined",
        "defaults",
        "speed",
        "compile",
        "graphs",
        "long",
        "workers",
        "eager",
    ):
        subprocess.run(["bash", "scripts/gpu_bench.sh", mode], cwd=work, env=env,
                       check=True, capture_output=True)  # fmt: skip
    commands = [line.split("\x1f") for line in calls.read_text().splitlines()]
    pattern = re.compile(r"python3? (bench/[a-z_]+\.py(?: [^`|\n]*)?)")
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for md in [*pages, *sorted((ROOT / "results").rglob("*.md"))]:
        commands += [shlex.split(m) for m in pattern.findall(md.read_text(encoding="utf-8"))]
    return [c for c in commands if c[0].startswith("bench/")]


def test_the_documented_command_lines_still_reach_the_work(monkeypatch, tmp_path):
    """The stricter options still take every command line the GPU job runs and the committed
    results were made with."""
    commands = documented_commands(tmp_path)
    assert len(commands) > 30 and len({c[0] for c in commands}) == 13
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # decode_speed, claims
    monkeypatch.setattr(dropout, "RAND_MASK_ON_CPU", dropout.RAND_MASK_ON_CPU)  # host_overhead
    for i, command in enumerate(commands):
        script, args = command[0].removeprefix("bench/").removesuffix(".py"), command[1:]
        if "--out" in args:  # the results' own files and folders stay as they are
            args[args.index("--out") + 1] = str(tmp_path / f"out{i}" / "result")
        for option in ("--ckpt", "--rnn-ckpt"):  # a trained run's, not in a checkout
            if option in args:
                (tmp_path / f"ckpt{i}{option}").touch()
                args[args.index(option) + 1] = str(tmp_path / f"ckpt{i}{option}")
        if "cuda" in args and not torch.cuda.is_available():
            continue
        with pytest.raises(AssertionError, match="started its work"):
            guarded(monkeypatch, script).main(args)


def test_a_crossover_is_found_where_a_kind_starts_lower_too():
    """A kind cheaper at short lengths and dearer at long ones was reported "never lower"."""
    crossover = load_bench("attention_claims").crossover
    assert crossover([128, 256, 512], [1, 5, 9], [2, 3, 4]).startswith("lower from n = 128 until")
    assert crossover([128, 256, 512], [3, 2, 1], [2, 2, 2]) == "n ~ 256"
    assert crossover([128, 256], [1, 1], [2, 2]) == "lower at every n measured (128 to 256)"
    assert crossover([128, 256], [3, 3], [2, 2]) == "never lower (128 to 256)"
