"""Never lose a run: kill -9 and resume is bit-identical, damaged checkpoints fall back,
NaN/inf updates are skipped, out-of-memory batches are retried in halves."""

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from transformer import checkpoint
from transformer.attention import stacked_from
from transformer.cli import busy_run_dir
from transformer.final_choice import FinalChoice
from transformer.run_data import prepare_data
from transformer.train_log import NullLog, SkipCounter
from transformer.trainer import (
    Trainer,
    TrainingError,
    inverse_sqrt,
    run_lock,
    train,
)

ROOT = Path(__file__).resolve().parent.parent


def train_cli(overrides, run_dir: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [*overrides, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("workers", [0, 2])  # batches made in the loop, or by 2 processes
def test_kill_9_then_resume_is_identical_to_an_uninterrupted_run(
    small_overrides, tmp_path, read_csv, last_logged_step, workers
):
    overrides = [o for o in small_overrides if not o.startswith("run_dir=")] + [
        f"trainer.data_workers={workers}",
        "trainer.max_steps=32",
        "trainer.eval_every=4",
        "trainer.bleu_every=1000",  # BLEU (and best.pt) only at the end
        "trainer.log_every=1",
        "trainer.patience=0",
        "trainer.keep_checkpoints=2",
        "model.dropout=0.3",  # the dropout RNG stream must be restored too
        "trainer.final.average_last=0",  # no final candidates to decode: not tested here
        "trainer.final.length_penalties=[]",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = train_cli(overrides, whole, tmp_path)
    victim = train_cli(overrides, killed, tmp_path)
    try:
        deadline = time.monotonic() + 600
        while last_logged_step(killed / "train_log.csv") < 14 and victim.poll() is None:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.01)  # steps take tens of ms: the kill lands well before step 32
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        assert not (killed / "metrics.json").exists()
        assert 14 <= last_logged_step(killed / "train_log.csv") < 32

        resumed = train_cli(overrides, killed, tmp_path)
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
        assert reference.wait(timeout=600) == 0, reference.stderr.read()
    finally:
        for proc in (reference, victim):
            proc.kill()

    losses = read_csv(whole / "train_log.csv", "step", "loss")
    assert [int(s) for s, _ in losses] == list(range(1, 33))
    assert read_csv(killed / "train_log.csv", "step", "loss") == losses
    fields = ("step", "valid_loss", "valid_bleu")
    assert read_csv(killed / "valid_log.csv", *fields) == read_csv(whole / "valid_log.csv", *fields)
    a = checkpoint.load(whole / "checkpoints" / "last.pt")
    b = checkpoint.load(killed / "checkpoints" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 32
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert len(checkpoint.step_checkpoints(killed / "checkpoints")) == 2


@pytest.mark.parametrize("workers", [0, 2])  # workers ignore the signal; the trainer ends them
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(
    small_overrides, tmp_path, last_logged_step, workers
):
    overrides = [o for o in small_overrides if not o.startswith("run_dir=")] + [
        f"trainer.data_workers={workers}",
        "trainer.max_steps=100000",
        "trainer.eval_every=100000",  # no checkpoint but the one the signal writes
        "trainer.bleu_every=100000",
        "trainer.log_every=1",
        "trainer.patience=0",
    ]
    run = tmp_path / "run"
    proc = train_cli(overrides, run, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while last_logged_step(run / "train_log.csv") < 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
        stderr = proc.stderr.read()
    finally:
        proc.kill()
    assert "run the same command to resume" in stderr and "Traceback" not in stderr
    step = checkpoint.load(run / "checkpoints" / "last.pt")["progress"]["step"]
    assert step == last_logged_step(run / "train_log.csv") >= 5
    # not a step file: the final average takes those of the evaluations, as if never stopped
    assert checkpoint.step_checkpoints(run / "checkpoints") == []


def test_a_train_log_row_across_a_checkpoint_is_the_same_after_a_resume(
    compose, small_overrides, tmp_path, read_csv
):
    """Rows every 3 updates, a checkpoint at update 4: the resumed run's row at update 6
    covered only updates 5 and 6 (its loss 5.8767 against 5.9362 never interrupted)."""
    rows = ["trainer.log_every=3", "trainer.eval_every=4", "trainer.bleu_every=1000",
            "model.dropout=0.3"]  # fmt: skip
    whole = make_trainer(compose, small_overrides, tmp_path / "whole", *rows, "trainer.max_steps=8")
    whole.run()
    first = make_trainer(compose, small_overrides, tmp_path / "cut", *rows, "trainer.max_steps=4")
    first.run()
    again = make_trainer(compose, small_overrides, tmp_path / "cut", *rows, "trainer.max_steps=8")
    assert again.resume() and again.step == 4
    assert (again.window.tokens, again.window.batches) == (first.window.tokens, 1)
    again.run()
    fields = ("step", "loss", "pad_frac")
    expected = read_csv(tmp_path / "whole" / "run" / "train_log.csv", *fields)
    assert [int(r[0]) for r in expected] == [3, 6]
    assert read_csv(tmp_path / "cut" / "run" / "train_log.csv", *fields) == expected


def test_the_updates_after_an_evaluation_train_with_dropout(compose, small_overrides, tmp_path):
    """Validation and BLEU decoding put the model in eval mode: left there, the updates
    after an evaluation trained without dropout (and a run resumed after one with it,
    other weights than the run never stopped)."""
    trainer = make_trainer(compose, small_overrides, tmp_path, "model.dropout=0.3",
                           "trainer.eval_every=2", "trainer.bleu_every=4")  # fmt: skip
    (batch,) = first_batches(trainer, 1)
    for trainer.step in (2, 4):  # the validation loss; with BLEU
        assert trainer.maybe_evaluate(NullLog(), out_of_time=False) is None
        with torch.no_grad():
            losses = [float(trainer.loss(trainer.to_device(batch))) for _ in range(2)]
        assert losses[0] != losses[1], trainer.step  # each pass drew its own dropout masks
    assert (tmp_path / "run" / "valid_greedy" / "step_00000004.hyp").is_file()  # decoded


def test_resume_falls_back_to_the_previous_good_checkpoint(
    compose, small_overrides, tmp_path, caplog, logged_steps
):
    caplog.set_level(logging.INFO)
    train(compose(small_overrides))  # 6 steps, checkpoints at 3 and 6
    ckpts = tmp_path / "run" / "checkpoints"
    with open(ckpts / "last.pt", "r+b") as f:  # step_6.pt is the same file
        f.truncate(1000)
    metrics = train(compose(small_overrides + ["trainer.max_steps=9"]))
    assert "resumed from" in caplog.text and "step_00000003.pt at step 3" in caplog.text
    assert "last.pt: unreadable or truncated" in caplog.text
    assert metrics["steps"] == 9
    # the lost step-6 row was dropped and written again
    assert logged_steps(tmp_path / "run" / "valid_log.csv") == [3, 6, 9]


def test_a_resume_from_an_older_step_file_mends_best_pt_and_drops_the_damaged_ones(
    compose, small_overrides, tmp_path, monkeypatch, caplog
):
    """BLEU best at step 4, where last.pt, step_4.pt and best.pt are one file: damaged,
    the resume from step 3 left best.pt damaged, and with no later gain the final choice
    failed on it after all training (and again at every rerun)."""
    scores = iter([1.0, 0.0, 0.0, 2.0])  # steps 1, 2, 3, 4
    monkeypatch.setattr(Trainer, "valid_bleu", lambda self: next(scores))
    schedule = ["trainer.max_steps=4", "trainer.eval_every=1", "trainer.bleu_every=1",
                "trainer.patience=0"]  # fmt: skip
    make_trainer(compose, small_overrides, tmp_path, *schedule).run()
    ckpts = tmp_path / "run" / "checkpoints"
    with open(ckpts / "last.pt", "r+b") as f:
        f.truncate(1000)
    again = make_trainer(compose, small_overrides, tmp_path, *schedule)
    assert again.resume() and (again.step, again.best_step) == (3, 1)
    assert checkpoint.load(ckpts / "best.pt")["progress"]["step"] == 1
    assert [p.name for p in checkpoint.step_checkpoints(ckpts)][0] == "step_00000003.pt"
    assert "step_00000001.pt linked as best.pt" in caplog.text


@pytest.mark.parametrize("step_file_too", [False, True])
def test_a_resume_from_last_pt_mends_a_best_pt_damaged_on_its_own(
    compose, small_overrides, tmp_path, monkeypatch, caplog, step_file_too
):
    """BLEU best at step 1, last.pt good at step 4: a damaged best.pt passed the resume and
    failed only in the final choice, after all training. Now it is linked again from
    step 1's file, or, where that file is the same damaged one (a hard link), removed."""
    scores = iter([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr(Trainer, "valid_bleu", lambda self: next(scores))
    schedule = ["trainer.eval_every=1", "trainer.bleu_every=1", "trainer.patience=0"]
    make_trainer(compose, small_overrides, tmp_path, *schedule, "trainer.max_steps=4").run()
    ckpts = tmp_path / "run" / "checkpoints"
    best, kept = ckpts / "best.pt", ckpts / "step_00000001.pt"
    assert kept.is_file() and checkpoint.load(best)["progress"]["step"] == 1
    if step_file_too:
        with open(best, "r+b") as f:  # and so the step file, where best.pt is its hard link
            f.truncate(1000)
        if kept.stat().st_size != 1000:  # a copy, not a link: damage the step file as well
            kept.write_bytes(b"damaged")
    else:
        best.unlink()  # best.pt alone
        best.write_bytes(b"damaged")
    again = make_trainer(compose, small_overrides, tmp_path, *schedule, "trainer.max_steps=6")
    assert again.resume() and (again.step, again.best_step) == (4, 1)
    if step_file_too:
        assert not best.exists() and "nor is that step kept: best.pt removed" in caplog.text
    else:
        assert checkpoint.load(best)["progress"]["step"] == 1
        assert "step_00000001.pt linked as best.pt" in caplog.text


def test_a_kill_between_last_pt_and_best_pt_is_mended_on_resume(
    compose, small_overrides, tmp_path, monkeypatch
):
    """A BLEU gain at step 2: last.pt is written, then linked as best.pt. A kill between the
    two left best.pt at step 1, which the final choice took for the run's best weights."""
    scores = iter([1.0, 2.0])  # steps 1, 2
    monkeypatch.setattr(Trainer, "valid_bleu", lambda self: next(scores))
    schedule = ["trainer.max_steps=2", "trainer.eval_every=1", "trainer.bleu_every=1"]
    make_trainer(compose, small_overrides, tmp_path, *schedule).run()
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "best.pt").unlink()  # as if killed before the link: step 1's is best.pt
    os.link(ckpts / "step_00000001.pt", ckpts / "best.pt")
    again = make_trainer(compose, small_overrides, tmp_path, *schedule)
    assert again.resume() and (again.step, again.best_step) == (2, 2)
    assert checkpoint.load(ckpts / "best.pt")["progress"]["step"] == 2


def test_a_second_run_in_a_run_dir_in_use_is_refused(compose, small_overrides, tmp_path):
    """Two runs in one folder (the same command started twice) each wrote every log row,
    checkpoint and best.pt over the other's; the second now stops before any work."""
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):  # as a run in another process holds it
        with pytest.raises(
            TrainingError, match=r"run_dir=.* is in use by another training run \(pid \d+"
        ):
            train(compose(small_overrides))
    assert sorted(p.name for p in run.iterdir()) == [".train.lock"]  # no config.yaml, no data
    with run_lock(run):  # released when its holder ends
        pass


def test_a_second_run_from_the_command_line_is_refused_before_hydra_writes(tmp_path, monkeypatch):
    """Hydra wrote its .hydra/ files over the running run's and added to its train.log
    before the trainer refused the second run; train.py now refuses it first."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RANK": "0"}
    with run_lock(run):  # as a run in another process holds it
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"run_dir={run}",
                              "trainer=debug"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        said = f"error: run_dir={run} is in use by another training run (pid {os.getpid()} on "
        assert out.returncode == 1 and out.stderr.startswith(said), out.stderr
        assert sorted(p.name for p in run.iterdir()) == [".train.lock"]  # no .hydra, no log
        assert busy_run_dir([f"hydra.run.dir={run}"]).startswith(f"run_dir={run} is in use")
        assert busy_run_dir([f"run_dir={run}", "hydra.run.dir=/elsewhere"])
        assert busy_run_dir([f"run_dir={tmp_path / 'other'}", f"hydra.run.dir={run}"]) is None
        monkeypatch.setenv("RANK", "1")  # torchrun's other ranks: rank 0 holds the lock
        assert busy_run_dir([f"run_dir={run}"]) is None
        monkeypatch.setenv("RANK", "0")
    assert busy_run_dir([f"run_dir={run}"]) is None  # released when its holder ends
    assert busy_run_dir([f"run_dir={tmp_path / 'new'}"]) is None  # nothing there: not made
    assert not (tmp_path / "new").exists()


def test_resume_refuses_another_model(compose, small_overrides):
    train(compose(small_overrides))
    with pytest.raises(TrainingError, match="holds another model"):
        train(compose(small_overrides + ["model.d_model=64", "trainer.max_steps=9"]))


def test_a_refused_resume_leaves_the_runs_hydra_files_as_they_were(small_overrides, tmp_path):
    """The trainer refused another model only once Hydra had written the command's .hydra/
    files over the run's own: they then named settings the run never trained with."""
    overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
    run = tmp_path / "run"
    first = train_cli([*overrides, "trainer.max_steps=2"], run, tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    hydra = run / "hydra" / ".hydra"
    before = {p.name: p.read_text() for p in hydra.iterdir()}
    refused = train_cli([*overrides, "model.d_ff=128", "trainer.max_steps=4"], run, tmp_path)
    assert refused.wait(timeout=300) == 1
    err = refused.stderr.read().strip().splitlines()
    assert (
        err[-1].startswith("error: ") and "holds another model (model.d_ff=64, now 128)" in err[-1]
    )
    assert {p.name: p.read_text() for p in hydra.iterdir()} == before


def test_keep_checkpoints_lowered_on_resume_leaves_no_older_step_file_to_average(
    compose, small_overrides, tmp_path
):
    """keep_checkpoints=0 wrote no step file and pruned none: the step files from before the
    resume stayed, and the final average took them (steps 3-6 of a run ended at 12)."""
    make_trainer(compose, small_overrides, tmp_path).run()  # step files 3 and 6
    ckpts = tmp_path / "run" / "checkpoints"
    assert len(checkpoint.step_checkpoints(ckpts)) == 2
    again = make_trainer(
        compose, small_overrides, tmp_path, "trainer.keep_checkpoints=0", "trainer.max_steps=9"
    )
    again.run()
    assert checkpoint.step_checkpoints(ckpts) == []
    assert FinalChoice(again).candidates() == [ckpts / "best.pt"]  # no average


def test_a_batch_order_changed_mid_epoch_on_resume_says_what_it_does(
    compose, small_overrides, tmp_path, caplog
):
    """A changed seed or data.max_tokens was one warning among others, "takes effect": the
    saved position within the epoch then points into another order (pairs twice or never)."""
    make_trainer(compose, small_overrides, tmp_path).run()  # 6 steps: epoch 1, 2 batches in
    with caplog.at_level(logging.WARNING):
        make_trainer(compose, small_overrides, tmp_path, "seed=7", "data.max_tokens=900")
    assert "data.max_tokens, seed changed in the middle of epoch 1 (2 batches done)" in caplog.text


def test_the_schedule_warms_up_linearly_then_decays_as_the_inverse_square_root():
    factor = inverse_sqrt(1000)  # Vaswani et al. 2017, eq. 3, scaled to peak 1 at warmup
    assert [factor(s) for s in (0, 1, 500, 1000, 4000, 16000)] == pytest.approx(
        [0.001, 0.001, 0.5, 1.0, 0.5, 0.25]
    )


def test_update_n_takes_the_schedules_factor_of_n_and_the_log_shows_it(
    compose, small_overrides, tmp_path, read_csv
):
    """LambdaLR counts the updates done: update 1 and 2 both took 1 / warmup of the peak,
    and update n the factor of n - 1, while train_log.csv showed the factor of n."""
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "trainer.warmup_steps=4", "trainer.log_every=1"
    )
    applied = []
    trainer.optimizer.register_step_pre_hook(
        lambda optim, args, kwargs: applied.append(optim.param_groups[0]["lr"])
    )
    trainer.run()
    peak, factor = trainer.t.optimizer.lr, inverse_sqrt(4)
    assert applied == pytest.approx([peak * factor(n) for n in range(1, 7)])
    assert factor(4) == 1.0 and factor(5) < 1.0  # update 4 is the peak
    logged = [float(lr) for _, lr in read_csv(tmp_path / "run" / "train_log.csv", "step", "lr")]
    assert logged == pytest.approx(applied)


def test_optimizer_settings_changed_on_resume_take_effect_and_another_optimizer_is_refused(
    compose, small_overrides, tmp_path, caplog
):
    """The saved groups' weight decay, betas and eps stayed in force unseen, while the
    warning said the new ones would."""
    train(compose(small_overrides))
    changed = ["trainer.optimizer.weight_decay=0.1", "trainer.optimizer.betas=[0.8,0.9]",
               "trainer.optimizer.eps=1e-6", "trainer.max_steps=9"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(compose, small_overrides, tmp_path, *changed)
        assert trainer.resume() and trainer.step == 6
    assert "trainer.optimizer.weight_decay=0.1 (was" in caplog.text
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.1, (0.8, 0.9), 1e-6)
    assert trainer.optimizer.state_dict()["state"]  # the moments are the checkpoint's
    sgd = ["trainer.optimizer._target_=torch.optim.SGD", "~trainer.optimizer.betas",
           "~trainer.optimizer.eps", "+trainer.optimizer.momentum=0.9"]  # fmt: skip
    with pytest.raises(TrainingError, match="holds another optimizer .*torch.optim.SGD"):
        make_trainer(compose, small_overrides, tmp_path, *sgd)


@pytest.mark.parametrize(
    "limit,raised",
    [
        ("trainer.max_epochs=1", "trainer.max_epochs=2"),
        ("trainer.max_time_minutes=1e-9", "trainer.max_time_minutes=60"),
        ("trainer.patience=1", "trainer.patience=3"),
    ],
)
def test_a_run_stopped_at_a_limit_and_started_again_trains_no_further(
    compose, small_overrides, tmp_path, monkeypatch, limit, raised
):
    """Only max_steps was known to have ended a run: one that stopped after its epochs, its
    time or its patience trained on when the same command ran again."""
    base = [limit, "trainer.max_steps=100000", "trainer.eval_every=1", "trainer.bleu_every=1"]
    monkeypatch.setattr(Trainer, "valid_bleu", lambda self: 10.0)  # never a gain after the first
    first = make_trainer(compose, small_overrides, tmp_path, *base)
    first.run()
    again = make_trainer(compose, small_overrides, tmp_path, *base)
    assert again.resume() and again.step == first.step
    assert again.run()["stop_reason"].startswith("already")
    assert again.step == first.step
    more = make_trainer(compose, small_overrides, tmp_path, *base, raised)
    assert more.resume()
    more.run()
    assert more.step > first.step


def test_a_max_steps_lowered_below_the_step_resumed_says_the_run_is_past_it(
    compose, small_overrides, tmp_path
):
    """It said "already at trainer.max_steps=3" of a run at step 6."""
    make_trainer(compose, small_overrides, tmp_path).run()
    again = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=3")
    stop = again.run()["stop_reason"]
    assert stop == "already at step 6, past trainer.max_steps=3" and again.step == 6


def test_a_finished_run_trained_on_sets_its_old_results_aside(
    compose, small_overrides, tmp_path, caplog
):
    """Its metrics.json stayed while it trained on, read by compare, runs_table.py and
    translate.py ckpt=RUN as the result of weights trained further (for good, if it was
    killed before the new one). Started again with nothing left to train, it keeps it."""
    make_trainer(compose, small_overrides, tmp_path).run()
    old = tmp_path / "run" / "metrics.json"
    old.write_text('{"steps": 6}\n')  # what finish() wrote
    make_trainer(compose, small_overrides, tmp_path).run()  # already at max_steps
    assert old.read_text() == '{"steps": 6}\n'
    with caplog.at_level(logging.WARNING, logger="transformer.trainer"):
        more = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=8")
        more.run()
    assert more.step == 8 and not old.exists()
    assert (tmp_path / "run" / "metrics.previous.json").read_text() == '{"steps": 6}\n'
    assert "renamed metrics.previous.json: training goes on from step 6" in caplog.text


def test_a_fresh_run_in_a_finished_runs_folder_sets_its_results_aside(
    compose, small_overrides, tmp_path, caplog
):
    """Its checkpoints deleted (as trainer.resume=false's refusal says) or never written, a
    run started afresh where another had finished left the old metrics.json in place
    until its own end (for good, if killed): compare and translate.py ckpt=RUN read it as
    the results of the new weights."""
    old = tmp_path / "run" / "metrics.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"steps": 6}\n')
    with caplog.at_level(logging.WARNING, logger="transformer.trainer"):
        fresh = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=1")
        assert not fresh.resume()
        fresh.run()
    assert not old.exists()
    assert (tmp_path / "run" / "metrics.previous.json").read_text() == '{"steps": 6}\n'
    assert "results of an earlier run in this folder, renamed metrics.previous" in caplog.text


def test_a_kill_between_last_pt_and_its_step_file_is_mended_on_resume(
    compose, small_overrides, tmp_path, caplog
):
    """last.pt is written at an evaluation, then linked as its step file: a kill between
    the two left no step file of that evaluation, for good, and the final average took an
    older one in its place. The write's temporary file, left by a kill during the write,
    is deleted too (a whole checkpoint's size)."""
    make_trainer(compose, small_overrides, tmp_path).run()  # evaluations at 3 and 6
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000006.pt").unlink()  # as if killed before the link
    (ckpts / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING):
        again = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=7")
        assert again.resume() and again.step == 6
    assert os.path.samefile(ckpts / "step_00000006.pt", ckpts / "last.pt")
    assert "last.pt was not linked as step_00000006.pt" in caplog.text
    assert not (ckpts / ".last.pt.tmp4242").exists() and ".last.pt.tmp4242: left by" in caplog.text
    # last.pt of a stop between evaluations (a signal) has no step file, and gets none
    (ckpts / "step_00000006.pt").unlink()
    last = checkpoint.load(ckpts / "last.pt")
    checkpoint.save(ckpts / "last.pt", {**last, "step_file": False})
    later = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=7")
    assert later.resume() and later.step == 6
    assert not (ckpts / "step_00000006.pt").exists()


def test_a_run_without_a_configured_lr_resumes_with_the_optimizers_default(
    compose, small_overrides, tmp_path
):
    """~trainer.optimizer.lr trains at AdamW's default peak, and the resume failed on the
    missing key ("Key 'lr' is not in struct") after the data was read."""
    make_trainer(compose, small_overrides, tmp_path, "~trainer.optimizer.lr").run()
    again = make_trainer(
        compose, small_overrides, tmp_path, "~trainer.optimizer.lr", "trainer.max_steps=7"
    )
    assert again.resume() and again.step == 6
    factor = inverse_sqrt(again.t.warmup_steps)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor(7))


@pytest.mark.parametrize("before,now", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_a_resume_by_another_count_of_processes_goes_on_where_the_ranks_were(
    before, now, monkeypatch
):
    """Each rank counts its own batches (rank r takes batches r, r + W, ... of the epoch's
    plan): resumed by another count of processes, the saved position meant other batches,
    and pairs came twice or not at all in that epoch. Now every batch of the epoch is
    trained, and none twice beyond the up to now - 1 that rounding repeats."""
    import numpy as np

    from transformer import data
    from transformer.resuming import position_for

    plan = list(range(24))  # the batches of one epoch, by index in its plan
    monkeypatch.setattr(data, "plan_batches", lambda *args: [np.array([b]) for b in plan])
    split = data.EncodedSplit.from_lists([[5]] * len(plan), [[6]] * len(plan))

    def shard(rank, world):  # the batches TokenBatcher deals to ``rank`` (a copy of its
        # layout checked nothing of it: a TokenBatcher dealing other shards passed)
        batcher = data.TokenBatcher(split, 10, 1, (0, 2, 3), rank=rank, world_size=world)
        return [int(b[0]) for b in batcher.epoch_batches(0)]

    for saved in range(0, 24 // before + 1):  # every position the ranks could save at
        done = [b for r in range(before) for b in shard(r, before)[:saved]]
        pos = position_for(saved, before, now, epoch=0)
        rest = [b for r in range(now) for b in shard(r, now)[pos:]]
        left_out = len(plan) % now  # the plan's tail that rank counts leave out
        assert set(done) | set(rest) >= set(plan[: len(plan) - left_out])
        assert len(done) + len(rest) - len(set(done) | set(rest)) <= now - 1


def test_a_checkpoint_says_how_many_processes_wrote_it(compose, small_overrides, tmp_path):
    make_trainer(compose, small_overrides, tmp_path).run()
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["world_size"] == 1 and last["progress"]["batch_in_epoch"] == 2
    last["world_size"] = 2  # as if written by two ranks, each 2 batches into epoch 1
    checkpoint.save(tmp_path / "run" / "checkpoints" / "last.pt", last)
    again = make_trainer(compose, small_overrides, tmp_path, "trainer.max_steps=7")
    assert again.resume() and (again.epoch, again.batch_in_epoch) == (1, 4)


def test_a_peak_lr_changed_on_resume_applies_from_the_resumed_step(
    compose, small_overrides, tmp_path, caplog, read_csv
):
    """The schedule is this run's config: resuming with another peak lr warns and uses it
    from the next update on (the checkpoint's scheduler state used to keep the old one)."""
    train(compose(small_overrides + ["trainer.optimizer.lr=1e-3"]))  # 6 steps, warmup 2
    cfg = compose(small_overrides + ["trainer.optimizer.lr=4e-3", "trainer.max_steps=10"])
    factor = inverse_sqrt(cfg.trainer.warmup_steps)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, tmp_path / "run")
        assert trainer.resume() and trainer.step == 6
    assert "trainer.optimizer.lr=0.004 (was 0.001)" in caplog.text
    # update 7 steps with the new peak lr, and so does every later one
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * factor(7))
    train(cfg)
    lrs = dict(read_csv(tmp_path / "run" / "train_log.csv", "step", "lr"))
    assert float(lrs["6"]) == pytest.approx(1e-3 * factor(6))
    for step in ("8", "10"):
        assert float(lrs[step]) == pytest.approx(4e-3 * factor(int(step)))


def test_a_run_saved_before_model_attention_existed_resumes(compose, small_overrides):
    """Checkpoints made before model.attention existed mean the defaults (scaled_dot)."""
    cfg = compose(small_overrides + ["model=transformer"])
    train(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.pt"
    ckpt = checkpoint.load(last)
    del ckpt["config"]["model"]["attention"]
    checkpoint.save(last, ckpt)
    train(compose(small_overrides + ["model=transformer", "trainer.max_steps=9"]))
    with pytest.raises(
        TrainingError, match=r"another model \(model\.attention\.\w+='scaled_dot', now 'local'\)"
    ):
        train(compose(small_overrides + ["model=transformer", "model.attention.kind=local"]))


def test_an_rnn_run_resumes(compose, small_overrides):
    """The RNN's model.attention is a scoring-function name, not the Transformer's mapping:
    comparing the saved config on resume must not read it as one."""
    rnn = [o for o in small_overrides if not o.startswith("model.")]
    rnn += ["model=rnn", "model.emb_dim=32", "model.hidden_size=32"]
    train(compose(rnn))
    metrics = train(compose(rnn + ["trainer.max_steps=9"]))
    assert metrics["steps"] == 9


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_keeps_the_runs_tokenizer_when_the_corpus_gives_another(
    compose, small_overrides, corpus_root, tmp_path, caplog
):
    """A corpus copied afresh, edited, or a cleared cache would train another tokenizer; the
    run's checkpoints mean its own pieces, so a resume keeps them (and never overwrites them)."""
    caplog.set_level(logging.INFO)
    train(compose(small_overrides))
    tok = tmp_path / "run" / "tokenizer" / "joint.model"
    before = sha(tok)
    changed = tmp_path / "data2"
    shutil.copytree(corpus_root, changed)
    for lang in ("de", "en"):
        with open(changed / "multi30k" / f"train.{lang}", "a", encoding="utf-8") as f:
            f.writelines(f"zquorvaxe plimbotrek {i} xylofanzer quembrit.\n" for i in range(150))
    moved = [o for o in small_overrides if not o.startswith("data.data_dir=")]
    moved.append(f"data.data_dir={changed}")
    fresh = prepare_data(compose(moved), tmp_path / "fresh")[3]["src_sha256"]
    assert fresh != before  # a new run on this corpus would get another tokenizer
    metrics = train(compose(moved + ["trainer.max_steps=9"]))
    assert "resumed from" in caplog.text and "the run's own tokenizer" in caplog.text
    assert metrics["steps"] == 9 and sha(tok) == before


def test_resume_refuses_other_tokenizer_settings_and_keeps_the_tokenizer(
    compose, small_overrides, tmp_path, monkeypatch
):
    """... before the corpus is read and encoded (a cleared cache re-encodes it all)."""
    train(compose(small_overrides))
    tok = tmp_path / "run" / "tokenizer" / "joint.model"
    before = sha(tok)

    def read_corpus(*args):
        raise AssertionError("the corpus was read before the refusal")

    monkeypatch.setattr("transformer.trainer.prepare_data", read_corpus)
    with pytest.raises(TrainingError, match=r"another tokenizer \(data\.vocab_size=300, now 250\)"):
        train(compose(small_overrides + ["data.vocab_size=250", "trainer.max_steps=9"]))
    assert sha(tok) == before
    # the run's config.yaml still describes its checkpoints
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.vocab_size == 300


def separate_qkv(ckpt: dict) -> dict:
    """``ckpt`` as it was written before the attention projections were stacked into
    ``in_proj``: separate q/k/v parameters, their optimizer states indexed in that order,
    and an optimizer group saved without the fused update."""
    model, optim = ckpt["model"], ckpt["optimizer"]
    group = optim["param_groups"][0]
    by_name = dict(zip(checkpoint.parameter_names(model), group["params"]))
    states, old_model, old_states = optim["state"], {}, []
    for name, tensor in model.items():
        if name.endswith("in_proj.bias"):
            continue
        if not name.endswith("in_proj.weight"):
            old_model[name] = tensor
            if name in by_name:
                old_states.append(states[by_name[name]])
            continue
        bias = name.replace("in_proj.weight", "in_proj.bias")
        for p, (w, b) in enumerate(zip(tensor.chunk(3), model[bias].chunk(3))):
            for full, piece in ((name, w), (bias, b)):
                old_model[stacked_from(full)[p]] = piece.clone()
                old_states.append(
                    {
                        k: v.chunk(3)[p].clone() if v.dim() > 0 else v
                        for k, v in states[by_name[full]].items()
                    }
                )
    ids = list(range(len(old_states)))
    old_group = {**group, "params": ids, "fused": None}
    return {
        **ckpt,
        "model": old_model,
        "optimizer": {"state": dict(zip(ids, old_states)), "param_groups": [old_group]},
    }


def test_a_run_saved_with_separate_qkv_projections_resumes_exactly(
    compose, small_overrides, tmp_path, caplog
):
    """Its optimizer state is re-indexed by parameter name, so the resumed run is the same
    as one resumed from the stacked layout (and the saved non-fused update is not reused)."""
    caplog.set_level(logging.INFO)
    base = [o for o in small_overrides if not o.startswith("run_dir=")] + ["model=transformer"]
    train(compose(base + [f"run_dir={tmp_path / 'run'}"]))
    shutil.copytree(tmp_path / "run", tmp_path / "legacy")
    last = tmp_path / "legacy" / "checkpoints" / "last.pt"
    checkpoint.save(last, separate_qkv(checkpoint.load(last)))
    assert "encoder.0.self_attn.q_proj.weight" in checkpoint.load(last)["model"]
    for name in ("run", "legacy"):
        train(compose(base + [f"run_dir={tmp_path / name}", "trainer.max_steps=9"]))
    assert "optimizer state re-indexed" in caplog.text
    stacked, legacy = (
        checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["model"]
        for name in ("run", "legacy")
    )
    assert stacked.keys() == legacy.keys()
    assert all(torch.equal(stacked[k], legacy[k]) for k in stacked)


def test_an_optimizer_state_that_matches_no_parameter_is_refused():
    model = torch.nn.Linear(2, 3)
    saved = {"weight": torch.zeros(3, 2), "other": torch.zeros(3)}
    optim = {"state": {0: {}, 1: {}}, "param_groups": [{"lr": 1.0, "params": [0, 1]}]}
    with pytest.raises(checkpoint.CheckpointError, match="no saved optimizer state for .*bias"):
        checkpoint.optimizer_state_for(model, list(saved), optim, stacked_from)


def make_trainer(compose, small_overrides, tmp_path, *extra) -> Trainer:
    cfg = compose(small_overrides + list(extra))
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, tmp_path / "run")


def first_batches(trainer: Trainer, n: int):
    stream = trainer.batches()
    return [next(stream)[1] for _ in range(n)]


def test_nan_loss_skips_the_update_on_the_device_then_aborts(
    compose, small_overrides, tmp_path, caplog
):
    """Fused AdamW skips a NaN/inf update itself (found_inf): no host sync per update; the
    skips are read, logged and checked against max_nonfinite at each log interval."""
    trainer = make_trainer(compose, small_overrides, tmp_path, "trainer.max_nonfinite=3")
    assert trainer.skip_on_device
    batches = first_batches(trainer, 4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **kw: forward(*a, **kw) * float("nan")
    loss, ntok = trainer.train_step([batches[0]])
    assert float(loss) == 0.0  # a skipped update adds nothing to the logged loss
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights untouched
    for state in trainer.optimizer.state.values():  # no Adam moment was updated
        assert float(state["step"]) == 0 and not state["exp_avg"].any()
        assert not state["exp_avg_sq"].any()
    assert trainer.train_tokens == ntok  # counted by the update, which did not know yet
    assert trainer.check_skips() == ntok  # its tokens are left out of the loss per token
    assert trainer.train_tokens == 0  # and out of the tokens trained on (tokens/s)
    with pytest.raises(TrainingError, match="3 updates in a row had a NaN/inf loss"):
        trainer.run()  # log_every=2: the run of 1 goes on; at step 2 it is 3 long
    assert "2 of the updates up to step 2 skipped: NaN/inf loss or gradient" in caplog.text
    trainer.model.forward = forward
    trainer.train_step([batches[1]])  # a finite batch trains again
    assert not torch.equal(
        trainer.model.state_dict()[next(iter(before))], next(iter(before.values()))
    )
    assert trainer.skips.read() == (0, 0, 0)


def test_an_inf_gradient_under_a_finite_loss_is_skipped_too(compose, small_overrides, tmp_path):
    trainer = make_trainer(compose, small_overrides, tmp_path)
    (batch,) = first_batches(trainer, 1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    weight = next(trainer.compute_model.parameters())
    weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, ntok = trainer.train_step([batch])
    assert float(loss) == 0.0 and trainer.check_skips() == ntok
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_accumulated_update_returns_the_summed_loss_of_all_its_micro_batches(
    compose, small_overrides, tmp_path
):
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "model.dropout=0", "model.attn_dropout=0",
        "model.act_dropout=0", "trainer.accum_steps=2",
    )  # fmt: skip
    batches = first_batches(trainer, 2)
    with torch.no_grad():  # before the update changes the weights
        each = [float(trainer.loss(trainer.to_device(b))) for b in batches]
    loss, ntok = trainer.train_step(batches)
    assert float(loss) == pytest.approx(sum(each), rel=1e-5)
    assert ntok == sum(int((b.tgt_out != trainer.pad_id).sum()) for b in batches)


def test_the_gradient_is_that_of_the_loss_per_target_token(compose, small_overrides, tmp_path):
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "model.dropout=0", "model.attn_dropout=0",
        "model.act_dropout=0",
    )  # fmt: skip
    (batch,) = first_batches(trainer, 1)
    ntok = int((batch.tgt_out != trainer.pad_id).sum())
    trainer.accumulate([batch], ntok)
    got = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad(set_to_none=True)
    (trainer.loss(trainer.to_device(batch)) / ntok).backward()
    for g, p in zip(got, trainer.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)
    norm = float(torch.cat([g.flatten() for g in got]).norm())
    assert 0.1 < norm < 100, norm  # per token, not a sum over hundreds of tokens


def test_training_stops_after_patience_evaluations_without_a_bleu_gain(
    compose, small_overrides, tmp_path, monkeypatch
):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.patience=2",
        "trainer.max_steps=30",
        "trainer.eval_every=2",
        "trainer.bleu_every=2",
    )
    # BLEU at steps 2, 4, ...: a gain at 2, none at 4, a gain at 6 (which starts the count
    # again: a run that kept counting stopped at 8), none at 8 (a tie) and 10 (a run that
    # took the tie for a gain stopped at 12, its best.pt step 8's)
    scores = iter([10.0, 9.0, 11.0, 11.0, 9.0, 9.0])
    monkeypatch.setattr(trainer, "valid_bleu", lambda: next(scores))
    assert trainer.run() == {"stop_reason": "no valid BLEU gain in 2 evaluations"}
    assert trainer.step == 10 and trainer.best_step == 6
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["progress"]["step"] == 6
    trainer.cfg.trainer.final.average_last = 0  # (no average to score)
    metrics = trainer.finish()
    assert (metrics["steps"], metrics["best_step"], metrics["best_valid_bleu"]) == (10, 6, 11.0)


def test_the_last_evaluation_scores_bleu_whatever_bleu_every(
    compose, small_overrides, tmp_path, read_csv
):
    """A run that ends between two BLEU evaluations still scores its last weights (and can
    make them best.pt)."""
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_steps=5",
        "trainer.eval_every=100",
        "trainer.bleu_every=100",
    )
    assert trainer.run() == {"stop_reason": "step/epoch limit"}
    ((step, bleu),) = read_csv(tmp_path / "run" / "valid_log.csv", "step", "valid_bleu")
    assert step == "5" and bleu != ""
    assert trainer.best_step == 5
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["progress"]["step"] == 5


def test_bleu_every_that_is_no_multiple_of_eval_every_still_scores_at_its_steps(
    compose, small_overrides, tmp_path, read_csv
):
    """BLEU was computed only inside a validation: every lcm(eval_every, bleu_every)."""
    trainer = make_trainer(
        compose, small_overrides, tmp_path,
        "trainer.max_steps=12", "trainer.eval_every=2", "trainer.bleu_every=3",
    )  # fmt: skip
    trainer.run()
    rows = read_csv(tmp_path / "run" / "valid_log.csv", "step", "valid_bleu")
    assert [int(s) for s, _ in rows] == [2, 3, 4, 6, 8, 9, 10, 12]
    assert [int(s) for s, bleu in rows if bleu != ""] == [3, 6, 9, 12]


def test_max_epochs_stops_at_the_end_of_the_epoch(compose, small_overrides, tmp_path):
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "trainer.max_epochs=1", "trainer.max_steps=100000"
    )
    batches = len(trainer.batcher.epoch_batches(0))
    assert trainer.run() == {"stop_reason": "step/epoch limit"}
    assert trainer.step == batches and trainer.batch_in_epoch == trainer.epoch_len == batches


def test_max_epochs_with_accumulation_trains_no_batch_of_the_next_epoch(
    compose, small_overrides, tmp_path
):
    """An update's micro-batches crossed the epoch's end: max_epochs=1 with accum_steps=3
    over 4 batches trained 2 batches of epoch 1. The last update is now shorter."""
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "trainer.max_epochs=1", "trainer.max_steps=100000",
        "trainer.accum_steps=3",
    )  # fmt: skip
    batches = len(trainer.batcher.epoch_batches(0))
    sizes = []
    step = Trainer.train_step
    trainer.train_step = lambda micro, packed=None: (
        sizes.append(len(micro)) or step(trainer, micro, packed)
    )
    assert trainer.run() == {"stop_reason": "step/epoch limit"}
    assert sum(sizes) == batches and max(sizes) == 3 and sizes[-1] == batches - 3 * (len(sizes) - 1)
    assert (trainer.epoch, trainer.batch_in_epoch) == (0, batches)


def test_the_time_limit_stops_training_and_scores_the_last_weights(
    compose, small_overrides, tmp_path, read_csv
):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_time_minutes=1e-9",  # up after the first update
        "trainer.max_steps=100000",
        "trainer.eval_every=100000",
        "trainer.bleu_every=100000",
    )
    assert trainer.run() == {"stop_reason": "time limit"}
    ((step, bleu),) = read_csv(tmp_path / "run" / "valid_log.csv", "step", "valid_bleu")
    assert trainer.step == 1 and step == "1" and bleu != ""


def test_the_time_limit_is_in_minutes_of_training(compose, small_overrides, tmp_path, monkeypatch):
    """max_time_minutes=1 with every update taking 25 s more: 50 s after two updates trains
    on, 75 s after three stops (a limit of 1e-9 minutes, the test above, stops after the
    first update whatever the unit)."""
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_time_minutes=1",
        "trainer.max_steps=100",
        "trainer.eval_every=100",
        "trainer.bleu_every=100",
    )
    step = trainer.train_step

    def slow_step(micro_batches, packed=None):
        trainer.train_seconds += 25.0  # the update's own time is added after it
        return step(micro_batches, packed)

    monkeypatch.setattr(trainer, "train_step", slow_step)
    assert trainer.run() == {"stop_reason": "time limit"}
    assert trainer.step == 3


def test_pad_frac_averages_every_micro_batch_of_the_window(
    compose, small_overrides, tmp_path, read_csv
):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.accum_steps=2",
        "trainer.log_every=1",
        "trainer.max_steps=3",
    )
    seen = []
    fraction = trainer.batcher.padding_fraction
    trainer.batcher.padding_fraction = lambda b: seen.append(fraction(b)) or seen[-1]
    trainer.run()
    logged = [float(x) for (x,) in read_csv(tmp_path / "run" / "train_log.csv", "pad_frac")]
    expected = [round((seen[i] + seen[i + 1]) / 2, 3) for i in (0, 2, 4)]
    assert len(seen) == 6 and logged == expected


def test_a_window_of_only_skipped_updates_logs_no_loss_row(compose, small_overrides, tmp_path):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_nonfinite=100",  # more than a log window (2): no abort
        "trainer.max_steps=4",
        "trainer.eval_every=100",
        "trainer.bleu_every=100",
    )
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **kw: forward(*a, **kw) * float("nan")
    trainer.run()
    assert trainer.step == 4
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert rows == ["step,epoch,loss,lr,tokens_per_s,pad_frac"]


def test_nan_loss_skips_on_the_host_with_an_optimizer_that_cannot(
    compose, small_overrides, tmp_path, caplog
):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_nonfinite=3",
        "trainer.optimizer._target_=torch.optim.RAdam",  # no fused kernel, no found_inf
    )
    assert not trainer.skip_on_device
    batches = first_batches(trainer, 4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **kw: forward(*a, **kw) * float("nan")
    assert trainer.train_step([batches[0]]) is None
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.optimizer.state_dict()["state"] == {}
    with pytest.raises(TrainingError, match="3 updates in a row had a NaN/inf loss"):
        trainer.run()
    assert "update skipped (1 in a row)" in caplog.text
    trainer.model.forward = forward
    assert trainer.train_step([batches[1]]) is not None


def test_a_skipped_last_update_of_the_last_epoch_ends_training_there(
    compose, small_overrides, tmp_path, read_csv
):
    """Skipped on the host (an optimizer with no fused kernel), the last epoch's last update
    went on to the next epoch's batches, trained past max_epochs until the next evaluation."""
    trainer = make_trainer(
        compose, small_overrides, tmp_path, "trainer.max_epochs=1", "trainer.max_steps=100000",
        "trainer.optimizer._target_=torch.optim.RAdam", "trainer.eval_every=100000",
        "trainer.bleu_every=100000",
    )  # fmt: skip
    assert not trainer.skip_on_device
    batches = len(trainer.batcher.epoch_batches(0))
    forward, calls = trainer.model.forward, []

    def nan_at_the_last(*args, **kwargs):
        calls.append(trainer.model.training)
        out = forward(*args, **kwargs)
        return out * float("nan") if sum(calls) == batches and calls[-1] else out

    trainer.model.forward = nan_at_the_last
    assert trainer.run() == {"stop_reason": "step/epoch limit"}
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (batches - 1, 0, batches)
    rows = read_csv(tmp_path / "run" / "valid_log.csv", "step")
    assert [int(s) for (s,) in rows] == [batches - 1]  # the final evaluation, once


def test_skips_apart_never_add_up_to_an_abort(compose, small_overrides, tmp_path, caplog):
    """max_nonfinite counts NaN/inf updates in a row: a good update in between resets it."""
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "trainer.max_nonfinite=2",
        "trainer.optimizer._target_=torch.optim.RAdam",  # skipped on the host
        "trainer.max_steps=4",
    )
    calls, forward = [], trainer.model.forward

    def every_other(*args, **kwargs):  # NaN in the 1st, 3rd, 5th, ... update
        out = forward(*args, **kwargs)
        if not trainer.model.training:  # validation
            return out
        calls.append(1)
        return out * float("nan") if len(calls) % 2 else out

    trainer.model.forward = every_other
    assert trainer.run() == {"stop_reason": "step/epoch limit"}
    assert trainer.step == 4 and "update skipped (2 in a row)" not in caplog.text
    assert caplog.text.count("update skipped (1 in a row)") == 4


def test_out_of_memory_is_retried_in_halves_with_the_same_gradient(
    compose, small_overrides, tmp_path, caplog
):
    trainer = make_trainer(
        compose,
        small_overrides,
        tmp_path,
        "model.dropout=0",
        "model.attn_dropout=0",
        "model.act_dropout=0",
    )
    batch = max(first_batches(trainer, 3), key=lambda b: len(b.src))
    assert len(batch.src) >= 4
    ntok = int((batch.tgt_out != trainer.pad_id).sum())
    trainer.accumulate([batch], ntok)
    expected = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)

    forward, limit = trainer.model.forward, len(batch.src) // 2 + 1
    calls = []

    def small_memory(src, *rest, **kw):
        calls.append(len(src))
        if len(src) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(src, *rest, **kw)

    trainer.model.forward = small_memory
    trainer.accumulate([batch], ntok)
    assert calls == [len(batch.src), (len(batch.src) + 1) // 2, len(batch.src) // 2]
    for p, g in zip(trainer.model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert "retrying it split in halves" in caplog.text

    calls.clear()
    limit = 0  # not even one sentence fits
    with pytest.raises(TrainingError, match=r"out of memory at step 1 on a batch of src \("):
        trainer.accumulate([batch], ntok)
    assert len(calls) == 1 + trainer.t.oom_retries  # each try fails on its first piece
    one = batch
    while len(one.src) > 1:
        one = one.halves()[0]
    caplog.clear()
    calls.clear()
    with pytest.raises(TrainingError, match=r"on a batch of src \(1, "):
        trainer.accumulate([one], ntok)
    assert calls == [1] and "retrying" not in caplog.text  # one sentence: nothing to split


def test_skip_counter_measures_a_run_across_reads_whole():
    skips = SkipCounter(torch.device("cpu"))
    for bad in (False, True, True):
        skips.record(torch.tensor(bad), 10)
    assert skips.read() == (2, 2, 20)  # (count, longest run, tokens)
    for bad in (True, False, True):
        skips.record(torch.tensor(bad), 5)
    assert skips.read() == (2, 3, 10)  # the run of 2 went on to 3
    assert skips.read() == (0, 0, 0)
