"""trainer.compile=true: torch.compile(dynamic=True) trains like the eager model and saves
the plain module. Slow (compiling takes 1-3 minutes on a 2-core CPU): ``pytest -m slow``."""

import csv

import pytest
import torch

from transformer import checkpoint
from transformer.trainer import train


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_the_plain_module(
    compose, small_overrides, tmp_path
):
    no_dropout = [
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        "trainer.log_every=1",
        "model.dropout=0.0",  # compiled dropout draws other masks than eager dropout
        "model.attn_dropout=0.0",
        "model.act_dropout=0.0",
    ]
    runs, losses = {}, {}
    for compiled in (False, True):
        run = tmp_path / f"run-{compiled}"
        overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
        cfg = compose([*overrides, *no_dropout, f"run_dir={run}", f"trainer.compile={compiled}"])
        metrics = train(cfg)
        assert metrics["steps"] == 3
        runs[compiled] = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
        with open(run / "train_log.csv", newline="") as f:
            losses[compiled] = [float(row["loss"]) for row in csv.DictReader(f)]

    # Same batches, same initial weights, no dropout: the same losses up to rounding (the
    # first one is a pure forward of the initial weights), and weights within one step of
    # Adam (lr 1e-3), which amplifies rounding where a gradient is near zero.
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=2e-3)
    eager, compiled = runs[False], runs[True]
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefix in the checkpoint
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-3, rtol=0)
