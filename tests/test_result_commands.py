"""Every committed run's command.txt still reproduces its config.yaml with today's code.

A results folder holds the resolved ``config.yaml`` the run trained with and the command that
made it. Defaults move on (the Transformer's peak lr went from 1e-3 to 2e-3, its dropout from
0.1 to 0.3), and then the recorded command silently trains something else. So each
``command.txt`` must give a ``python train.py`` command that, composed with today's ``conf/``,
yields the run's recipe again: the original command while the defaults have not moved, else a
command after a line starting with ``# Rerun with today's code``, which pins what moved.

Compared: every key both configs have, except where the run happened (ENVIRONMENT). A key
today's config has and the run's lacks was added since; it must be listed in ADDED, with the
value that behaves as the code did before it existed, or as changing no result.
"""

import json
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transformer.resuming import flatten, with_full_attention

ROOT = Path(__file__).resolve().parent.parent
RUNS = sorted(p.parent for p in (ROOT / "results").glob("**/config.yaml"))
RERUN_MARKER = "# rerun with today's code"

# where and how the run happened, not what it learned
ENVIRONMENT = {
    "run_dir",
    "device",
    "data.data_dir",
    "data.cache_dir",
    "data.hub_data_dir",
    # encoding workers: map() keeps the order and sentencepiece is deterministic (and a split
    # under 100,000 pairs, as all of Multi30k's, is encoded without workers anyway)
    "data.num_proc",
    "trainer.progress_bar",
    "trainer.resume",
}
NO_EFFECT = object()
# keys added after some runs were made: the value that reproduces the code before the key
# existed, or NO_EFFECT for settings that change speed, memory or robustness, not results
ADDED = {
    "trainer.final.average_last": 0,  # before trainer.final: best.pt only,
    "trainer.final.length_penalties": [],  # at decode.length_penalty,
    "trainer.final.beam_sizes": [],  # and decode.beam_size
    "trainer.keep_checkpoints": NO_EFFECT,  # only the averaging above reads it
    "trainer.fused_loss": NO_EFFECT,  # the same loss as the plain one (test_loss.py)
    "trainer.cpu_malloc_reuse": NO_EFFECT,
    "trainer.compile": False,  # eager, as before the option
    "trainer.compile_mode": "default",  # torch.compile's default, as before the option
    # auto (the default since 2026-12-04) acts on CUDA only: another attention kernel, or the
    # same pairs several to a row, with the same loss and gradients (test_packing.py,
    # test_train_smoke.py); on a GPU the rounding and the dropout draws differ, as on
    # another GPU, not the recipe. On the CPU auto is what the runs had (torch's kernels,
    # padded batches)
    "trainer.sdpa_backends": NO_EFFECT,
    "trainer.packed_rows": NO_EFFECT,
    "trainer.dist_backend": NO_EFFECT,
    "trainer.dist_timeout_minutes": NO_EFFECT,
    "trainer.max_nonfinite": NO_EFFECT,  # aborts a diverging run sooner or later
    "trainer.oom_retries": NO_EFFECT,
    "trainer.data_workers": NO_EFFECT,  # the same batches in the same order (test_prefetch.py)
    "data.hub_revision": NO_EFFECT,  # the Hub is not read when data_dir has the files
    "data.mapped_budget_mb": NO_EFFECT,
    "decode.min_len": 0,
    "decode.sample": False,
    "decode.seed": NO_EFFECT,  # sampling only
    "decode.temperature": NO_EFFECT,
    "decode.top_k": NO_EFFECT,
    "decode.top_p": NO_EFFECT,
}  # model.attention needs no entry: a run without it meant the defaults, as on resume
# GPUs of compute capability 8.0 and up, by the names torch gives them in metrics.json
BF16_GPUS = ("A100", "H100", "H200")


def same_on_its_device(key: str, recorded, today, device: str | None) -> bool:
    """Values that train alike on the device the run had: trainer.precision=auto (the default;
    bf16 was before it; settings.resolve_precision) picks fp32 on the CPU, where bf16 autocast
    ran as fp32, and bf16 on a GPU with bf16 tensor cores; the SDPA kernels and packed rows
    of ``auto`` compute the same loss and gradients as the settings before it."""
    if key == "trainer.precision" and (recorded, today) == ("bf16", "auto"):
        return device == "cpu" or any(name in (device or "") for name in BF16_GPUS)
    if (key, recorded, today) in (("trainer.sdpa_backends", None, "auto"),
                                  ("trainer.packed_rows", 0, "auto")):  # fmt: skip
        return True  # the defaults before 2026-12-04: why auto trains alike is under ADDED
    return recorded == today


def commands(text: str) -> list[tuple[bool, list[str]]]:
    """(follows the rerun marker, argv) of each shell command in a command.txt: comment
    lines skipped, backslash continuations joined."""
    out, pending, marked, after_marker = [], "", False, False
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            after_marker = after_marker or stripped.lower().startswith(RERUN_MARKER)
            continue
        if not pending:
            marked, after_marker = after_marker, False
        pending += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            out.append((marked, shlex.split(pending)))
            pending = ""
    return out


def train_overrides(text: str) -> list[str]:
    """The overrides of the command to check: the one after the rerun marker, else the first
    ``train.py`` command (environment variables, taskset and Hydra's own keys dropped)."""
    trains = [
        (marked, argv[i + 1 :])
        for marked, argv in commands(text)
        for i, word in enumerate(argv)
        if word.endswith("train.py")
    ]
    assert trains, "no python train.py command"
    rerun = [args for marked, args in trains if marked]
    assert len(rerun) <= 1, "more than one rerun command"
    args = rerun[0] if rerun else trains[0][1]
    return [a for a in args if not a.startswith("hydra.")]


def recipe_drift(recorded: dict, today: dict, device: str | None = None) -> list[str]:
    """What today's composed config would train differently from the recorded one, on the
    ``device`` the run trained on."""
    recorded, today = (flatten(with_full_attention(c)) for c in (recorded, today))
    problems = [
        f"{key}: the run had {recorded[key]!r}, the command now gives {today[key]!r}"
        for key in sorted(recorded.keys() & today.keys() - ENVIRONMENT)
        if not same_on_its_device(key, recorded[key], today[key], device)
    ]
    for key in sorted(today.keys() - recorded.keys() - ENVIRONMENT):
        if key not in ADDED:
            problems.append(f"{key}: added since the run; say in ADDED what the run behaved as")
        elif ADDED[key] is not NO_EFFECT and today[key] != ADDED[key]:
            problems.append(
                f"{key}: added since the run; {ADDED[key]!r} reproduces it, not {today[key]!r}"
            )
    problems += [
        f"{key}: in the run's config, gone today" for key in sorted(recorded.keys() - today.keys())
    ]
    return problems


def composed(compose, overrides: list[str]) -> dict:
    cfg = compose([*overrides, "run_dir=/unused"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: str(r.relative_to(ROOT / "results")))
def test_command_reproduces_the_recorded_config(compose, run):
    assert (run / "command.txt").is_file(), "a run's config.yaml without the command that made it"
    overrides = train_overrides((run / "command.txt").read_text("utf-8"))
    recorded = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    metrics = run / "metrics.json"
    device = json.loads(metrics.read_text())["device"] if metrics.is_file() else None
    drift = recipe_drift(recorded, composed(compose, overrides), device)
    assert not drift, "command.txt no longer gives the run's recipe:\n" + "\n".join(drift)


def test_every_result_folder_is_checked():
    assert len(RUNS) >= 28  # those committed when this test was written


def test_parser_reads_the_committed_layouts():
    text = """# a comment, then an environment, taskset and continuation lines
MT_DATA_DIR=../shared/data OMP_NUM_THREADS=1 taskset -c 1 python train.py model=rnn \\
    trainer.max_steps=3500 hydra.run.dir=outputs/x
python -m transformer.evaluate outputs/x/checkpoints/best.pt --split test2016
"""
    assert train_overrides(text) == ["model=rnn", "trainer.max_steps=3500"]
    rerun = text + "# Rerun with today's code (lr moved):\npython3 train.py model=rnn 'a.b=[]'\n"
    assert train_overrides(rerun) == ["model=rnn", "a.b=[]"]


def test_drift_is_caught(compose):
    """A moved default, an added key with an effect and a removed key are all reported."""
    recorded = composed(compose, ["trainer.optimizer.lr=1e-3"])
    assert recipe_drift(recorded, composed(compose, ["trainer.optimizer.lr=1e-3"])) == []
    drift = recipe_drift(recorded, composed(compose, []))
    assert drift == ["trainer.optimizer.lr: the run had 0.001, the command now gives 0.002"]
    del recorded["trainer"]["final"], recorded["seed"]
    recorded["model"]["old_key"] = 1
    drift = recipe_drift(recorded, composed(compose, ["trainer.optimizer.lr=1e-3"]))
    assert [d.split(":")[0] for d in drift] == [
        "seed",
        "trainer.final.average_last",
        "trainer.final.length_penalties",
        "model.old_key",
    ]


def test_a_bf16_run_is_reproduced_by_auto_precision_only_where_auto_picks_the_same(compose):
    recorded = composed(compose, ["trainer.precision=bf16"])
    today = composed(compose, [])  # trainer.precision=auto
    for device in ("cpu", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"):
        assert recipe_drift(recorded, today, device) == [], device
    for device in ("Tesla T4", None):  # auto picks fp32 on a T4; no metrics, no device
        assert recipe_drift(recorded, today, device) == [
            "trainer.precision: the run had 'bf16', the command now gives 'auto'"
        ], device
