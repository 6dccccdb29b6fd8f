"""torchrun with 2 CPU processes (gloo): each rank trains on its own shard of the batches,
the ranks end with identical weights, only rank 0 writes files, the run resumes, and a
SIGTERM to one rank stops both after the same update with a checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transformer import checkpoint
from transformer.distributed import DEBUG_ENV, Dist, DistributedError, from_env, state_dict_sha256
from transformer.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent


def torchrun_popen(overrides, run_dir: Path, debug_dir: Path, cwd: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        DEBUG_ENV: str(debug_dir),
    }
    args = [*overrides, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*cmd, str(ROOT / "train.py"), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (Linux /proc)."""
    for children in Path(f"/proc/{torchrun_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {torchrun_pid})")


def read_debug(debug_dir: Path, rank: int) -> tuple[list[dict], list[str]]:
    """(micro-batch records, final weight hashes in order) written by one rank."""
    records = [json.loads(line) for line in (debug_dir / f"rank{rank}.jsonl").open()]
    batches = [r for r in records if "examples" in r]
    return batches, [r["weights_sha256"] for r in records if "weights_sha256" in r]


def comparable(small_overrides) -> list[str]:
    """Overrides of a 4-step run that one process accumulating 2 batches per update can
    redo, so that its weights can be compared with the 2 ranks' ones."""
    return [o for o in small_overrides if not o.startswith("run_dir=")] + [
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.bleu_every=2",
        "trainer.log_every=1",
        "trainer.patience=0",
        "data.max_tokens=300",  # small batches: a few per rank and epoch
        "model.dropout=0",  # so that one process can redo the same updates
        "model.attn_dropout=0",
        "model.act_dropout=0",
        # Adam's eps=1e-9 turns rounding noise in a zero gradient (the key bias) into full
        # steps; eps=1 keeps updates proportional to gradients, so the runs can be compared.
        "trainer.optimizer.eps=1.0",
        "trainer.optimizer.lr=0.1",
        # no clipping: a clipped gradient has the same norm at any scale, which would hide a
        # wrong normalisation by the ranks' token count
        "trainer.clip_norm=1e9",
    ]


def test_two_processes_shard_data_agree_on_weights_resume_and_stop_together(
    compose, small_overrides, tmp_path, read_csv, logged_steps, last_logged_step
):
    overrides = comparable(small_overrides)
    run, debug = tmp_path / "run", tmp_path / "debug"
    proc = torchrun_popen(overrides, run, debug, tmp_path)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    (b0, w0), (b1, w1) = read_debug(debug, 0), read_debug(debug, 1)
    assert [r["step"] for r in b0] == [r["step"] for r in b1] == [1, 2, 3, 4]
    for step in range(4):  # same epoch here, so no example may be trained on by both ranks
        assert b0[step]["epoch"] == b1[step]["epoch"] == 0
    seen0 = {i for r in b0 for i in r["examples"]}
    seen1 = {i for r in b1 for i in r["examples"]}
    assert seen0 and seen1 and not seen0 & seen1
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    assert w0 == w1 == [state_dict_sha256(last["model"])]

    # Rank r trains on batches r, r+2, ... of the epoch, so one process accumulating 2
    # batches per update sees the same pairs: the same gradients if the loss normalisation
    # over all ranks' tokens is right.
    single = compose([*overrides, f"run_dir={tmp_path / 'single'}", "trainer.accum_steps=2"])
    train(single)
    alone = checkpoint.load(tmp_path / "single" / "checkpoints" / "last.pt")["model"]
    for name, tensor in last["model"].items():
        torch.testing.assert_close(tensor, alone[name], rtol=1e-4, atol=1e-5, msg=name)
    # validation sums loss and tokens over the ranks' shards of valid: one process's figures
    fields = ("step", "valid_loss", "valid_nll")
    two, one = (read_csv(d / "valid_log.csv", *fields) for d in (run, tmp_path / "single"))
    assert [r[0] for r in two] == [r[0] for r in one] == ["2", "4"]
    for a, b in zip(two, one):
        for x, y in zip(a[1:], b[1:]):
            assert abs(float(x) - float(y)) < 5e-4, (fields, a, b)  # logged to 1e-4

    # Rank 0 alone wrote: one row per step, one log line per evaluation, one set of files.
    assert logged_steps(run / "train_log.csv") == [1, 2, 3, 4]
    assert logged_steps(run / "valid_log.csv") == [2, 4]
    log_text = (run / "hydra" / "train.log").read_text()
    assert log_text.count("valid loss") == 2, log_text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "avg_last2.pt",  # rank 0 averaged, both ranks scored it on valid
        "best.pt",
        "last.pt",
        "step_00000002.pt",
        "step_00000004.pt",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    for split in ("valid", "test2016"):
        n = len((run / f"{split}.hyp").read_text("utf-8").splitlines())
        assert n == metrics[split]["sentences"], split
    candidates = {r["checkpoint"] for r in metrics["final"]["candidates"]}
    assert candidates == {"checkpoints/best.pt", "checkpoints/avg_last2.pt"}

    # Resume, then SIGTERM one rank only: every rank stops after the same update and rank 0
    # saves it (the stop flag is all-reduced), so both ranks end on the saved weights.
    proc = torchrun_popen(
        [*overrides, "trainer.max_steps=100000", "trainer.eval_every=100000"], run, debug, tmp_path
    )
    try:
        deadline = time.monotonic() + 240
        while last_logged_step(run / "train_log.csv") < 6 and proc.poll() is None:
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.05)
        os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "run the same command to resume" in stderr, stderr[-3000:]
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    stopped = last["progress"]["step"]
    assert stopped == last_logged_step(run / "train_log.csv") >= 6
    (b0, w0), (b1, w1) = read_debug(debug, 0), read_debug(debug, 1)
    assert [r["step"] for r in b0][4:] == [r["step"] for r in b1][4:] == list(range(5, stopped + 1))
    assert w0[-1] == w1[-1] == state_dict_sha256(last["model"])
    assert "resumed from" in (run / "hydra" / "train.log").read_text()
    assert logged_steps(run / "train_log.csv") == list(range(1, stopped + 1))


def test_two_processes_with_bf16_weights_and_packed_rows_agree_on_their_fp32_weights(
    compose, small_overrides, tmp_path
):
    """trainer.precision=bf16-weights: DDP averages the bf16 copy's gradients, every rank
    updates its fp32 weights alike, and they are those of one process redoing the run
    (up to bf16 rounding: the ranks' gradients are averaged in bf16). The two GPU speed
    options together: the batches are packed rows, whose segments DDP passes through, made
    and packed by a data worker of each rank (trainer.data_workers)."""
    overrides = comparable(small_overrides) + [
        "trainer.precision=bf16-weights",
        "trainer.packed_rows=64",
        "trainer.data_workers=1",
        "trainer.final.average_last=0",
        "trainer.final.length_penalties=[]",
    ]
    run, debug = tmp_path / "run", tmp_path / "debug"
    proc = torchrun_popen(overrides, run, debug, tmp_path)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    (b0, w0), (b1, w1) = read_debug(debug, 0), read_debug(debug, 1)
    assert not {i for r in b0 for i in r["examples"]} & {i for r in b1 for i in r["examples"]}
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    assert w0 == w1 == [state_dict_sha256(last["model"])]
    assert all(v.dtype == torch.float32 for v in last["model"].values())

    # one process on padded batches: packing changes the layout, not the sums
    single = [f"run_dir={tmp_path / 'single'}", "trainer.accum_steps=2", "trainer.packed_rows=0"]
    train(compose([*overrides, *single]))
    alone = checkpoint.load(tmp_path / "single" / "checkpoints" / "last.pt")["model"]
    initial = Trainer(compose([*overrides, f"run_dir={tmp_path / 'init'}"]), tmp_path / "init")
    for name, before in initial.model.state_dict().items():
        moved = (last["model"][name] - before).abs().max()  # 0.001 to 0.025
        off = (last["model"][name] - alone[name]).abs().max()  # at most 3% of moved, measured
        assert off <= 0.1 * moved, (name, float(off), float(moved))


def test_unwrap_sees_through_ddp_and_compile_in_either_order():
    import torch.distributed as dist

    model = torch.nn.Linear(2, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        compiled_ddp = torch.compile(ddp)  # compilation is lazy: nothing is compiled here
        ddp_compiled = torch.nn.parallel.DistributedDataParallel(torch.compile(model))
        for wrapped in (ddp, compiled_ddp, ddp_compiled, torch.compile(model), model):
            assert checkpoint.unwrap(wrapped) is model
    finally:
        dist.destroy_process_group()


class RankOne(Dist):
    """Rank 1 without a process group: every collective gives this rank's own values back
    (as ``Dist`` does for one process), and its share of a split is all of it."""

    def shard(self, items: list) -> list:
        return list(items)


def test_a_rank_other_than_0_writes_no_file(compose, small_overrides, tmp_path):
    """Rank 0 alone writes a run's logs, checkpoints, hypotheses and metrics.json, sets an
    earlier metrics.json aside and deletes the temporary files of killed writes: ranks
    writing the same names raced each other, and the two-process test, whose files are the
    same by name from either rank, passed when every rank wrote its checkpoints. Here rank 1
    trains and finishes a run whose data rank 0 prepared; the folder is as it was."""
    cfg = compose(small_overrides + ["trainer.max_steps=3", "data.test_splits=[]"])
    run = tmp_path / "run"
    Trainer(cfg, run)  # rank 0: the tokenizer
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.pt.tmp1").write_bytes(b"rank 0's, being written")
    (run / "metrics.json").write_text("{}")  # a finished run's, which rank 0 sets aside

    def files() -> dict:
        return {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}

    before = files()
    other = Trainer(cfg, run, RankOne(rank=1))
    assert other.run() == {"stop_reason": "step/epoch limit"} and other.step == 3
    assert other.finish()["valid"]["sentences"] > 0
    assert files() == before


def test_ranks_draw_their_own_dropout_masks(compose, small_overrides, tmp_path):
    """Rank 0 keeps the random stream of a single process; another rank reseeds from
    (seed, rank, step), so its dropout masks differ from rank 0's, change with the step it
    starts at and are the same when it resumes at that step. (The two-process tests train
    without dropout, to compare weights, so they cannot see this.)"""
    trainer = Trainer(compose(small_overrides), tmp_path / "run")
    x = torch.ones(1000)

    def mask(rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(0)  # the stream every rank starts from
        trainer.dist, trainer.step = Dist(rank, 2), step
        trainer.reseed_rank()
        return torch.nn.functional.dropout(x, 0.5) > 0

    single = mask(0, 0)
    torch.manual_seed(0)
    assert torch.equal(single, torch.nn.functional.dropout(x, 0.5) > 0)
    assert torch.equal(mask(0, 7), single)  # rank 0: the single-process stream
    other = mask(1, 0)
    assert not torch.equal(other, single)
    assert not torch.equal(mask(1, 7), other)
    assert torch.equal(mask(1, 7), mask(1, 7))


def test_every_update_reseeds_the_ranks_masks_from_its_step(
    compose, small_overrides, tmp_path, monkeypatch
):
    """Seeded only when the trainer was built (and at a resume), rank 1's stream depended on
    where the run had last started: a 2-process run with dropout, stopped at step 4 and
    resumed, trained other weights from step 5 on (0.005 apart at step 8) than one never
    stopped. Reseeded from (seed, rank, step) before every update, its masks depend on the
    step alone (the test above), whoever started the run where."""
    trainer = Trainer(compose(small_overrides + ["trainer.max_steps=3"]), tmp_path / "run")
    seeded, train_step = [], trainer.train_step
    monkeypatch.setattr(trainer, "reseed_rank", lambda: seeded.append(("seed", trainer.step)))

    def spy(micro, packed=None):
        seeded.append(("update", trainer.step))
        return train_step(micro, packed)

    monkeypatch.setattr(trainer, "train_step", spy)
    trainer.run()
    assert seeded == [(kind, step) for step in range(3) for kind in ("seed", "update")]


def test_unshard_inverts_shard_for_uneven_shards():
    items = list(range(7))
    for world_size in (1, 2, 3):
        shards = [Dist(rank, world_size).shard(items) for rank in range(world_size)]
        assert sorted(i for s in shards for i in s) == items  # each item in one shard
        assert Dist(0, world_size).unshard(shards) == items, world_size
    assert Dist(1, 3).shard(items) == [1, 4]


def test_rank_layout_from_torchruns_environment(monkeypatch):
    """On a second node the global rank and the rank on the node differ."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    # the first process of the second node is not the run's main one, which writes its files
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert (from_env().is_main, Dist(0, 4, 1).is_main) == (False, True)
    monkeypatch.delenv("RANK")
    with pytest.raises(DistributedError, match="RANK/LOCAL_RANK are missing"):
        from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_env() == Dist()


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun, device=cuda (or auto) is cuda:LOCAL_RANK: one GPU per process, not
    every rank on GPU 0. (CUDA is faked present: the device is only named, not used.)"""
    from transformer.settings import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert pick_device("cuda:0", local_rank=2) == torch.device("cuda", 2)
    assert pick_device("cuda") == torch.device("cuda")  # one process: as given
    assert pick_device("cpu", local_rank=1) == torch.device("cpu")
