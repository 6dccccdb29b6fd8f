"""The GPU job scripts, run on the CPU: a GPU session has minutes, so what its one call does
must already work (about 1.5 minutes: tiny models are trained, averaged and scored)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = "trainer=debug data.vocab_size=300 device=cpu"
TINY = f"{SMALL} model.d_model=32 model.n_heads=2 model.d_ff=64 model.n_enc_layers=1"
TINY += " model.n_dec_layers=1"
TINY_RNN = f"model=rnn {SMALL} model.emb_dim=32 model.hidden_size=32"


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def gpu_job(work: Path, out: Path, runs: list[str], **env) -> None:
    env = {
        **os.environ,
        "SKIP_INSTALL": "1",  # this machine has the packages
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(out),
        "MT_CACHE_DIR": str(work / "cache"),
        **env,
    }
    subprocess.run(["bash", "scripts/gpu_job.sh", *runs], cwd=work, env=env, check=True)


def test_gpu_job_trains_averages_and_scores_every_run(corpus_root, tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("conf", "transformer", "scripts", "train.py"):
        (work / name).symlink_to(ROOT / name)
    (work / ".gpudata").symlink_to(corpus_root)
    keep = "trainer.keep_checkpoints=5 trainer.patience=0"
    gpu_job(
        work,
        tmp_path / "out",
        ["tf", f"{TINY} {keep}", "rnn", f"{TINY_RNN} {keep}"],
        AVERAGE="2",
        VALID_DECODES="beam",
        GRID_RUNS="tf",
        GRID_DECODES="greedy beam",
    )
    n_valid = len((corpus_root / "multi30k" / "valid.en").read_text().splitlines())
    for run, decodes in (("tf", {"greedy", "beam"}), ("rnn", {"beam"})):
        assert (work / "runs" / run / "checkpoints" / "avg_last2.pt").is_file()
        for split in ("valid", "test2016"):
            rows = json.loads((work / f"runs/{run}/evaluate-{split}/results.json").read_text())
            got = {(r["name"], r["decode"]) for r in rows}
            assert got == {(f"{run}-{c}", d) for c in ("best", "avg_last2") for d in decodes}
        for r in json.loads((work / f"runs/{run}/evaluate-valid/results.json").read_text()):
            assert len((work / r["hypotheses"]).read_text().splitlines()) == n_valid
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts/runs_table.py"), "--averaged", "runs/tf", "runs/rnn"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for line, run in zip(table[2:4], ("tf", "rnn")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"[{run}]({run}/)" and len(cells) == 12
        rows = json.loads((work / f"runs/{run}/evaluate-test2016/results.json").read_text())
        beam = {r["name"]: r["bleu"] for r in rows if r["decode"] == "beam"}
        assert [float(c) for c in cells[10:]] == pytest.approx(
            [beam[f"{run}-best"], beam[f"{run}-avg_last2"]], abs=0.005
        )
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/tf/metrics.json" in names and not any(n.endswith(".pt") for n in names)

    # Without AVERAGE: best.pt of each run on test2016 with each of $DECODES.
    gpu_job(work, tmp_path / "out2", ["plain", TINY], DECODES="greedy")
    rows = json.loads((work / "runs/evaluate-plain/results.json").read_text())
    assert [(r["name"], r["split"], r["decode"]) for r in rows] == [("plain", "test2016", "greedy")]
