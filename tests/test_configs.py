"""Every option of every config group composes and instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
    for g in ("data", "model", "trainer", "decode")
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}", "run_dir=/tmp/unused"])
    assert cfg[group] is not None
    if group == "model":
        model = instantiate(cfg.model, src_vocab_size=64, tgt_vocab_size=64, pad_id=0)
        assert model.num_parameters() > 0
    if group == "trainer":
        import torch

        params = [torch.nn.Parameter(torch.zeros(2))]
        opt = instantiate(cfg.trainer.optimizer)(params)
        assert isinstance(opt.param_groups[0]["betas"], (list, tuple))


def test_translate_config_composes(compose):
    cfg = compose(["ckpt=x.pt"], name="translate")
    assert cfg.decode.beam_size >= 1 and cfg.ckpt == "x.pt"


@pytest.mark.parametrize(
    "overrides,lr",
    [
        ([], 2.0e-3),  # conf/trainer/model/transformer.yaml over trainer/default
        (["model=rnn"], 2.0e-3),  # conf/trainer/model/rnn.yaml
        (["trainer=debug"], 2.0e-3),  # merged over any trainer choice
        (["trainer.optimizer.lr=5e-4"], 5.0e-4),  # the command line still wins
        (["model=rnn", "trainer.optimizer.lr=3e-3"], 3.0e-3),
    ],
)
def test_per_model_trainer_settings(compose, overrides, lr):
    cfg = compose([*overrides, "run_dir=/tmp/unused"])
    assert cfg.trainer.optimizer.lr == pytest.approx(lr)
    assert cfg.trainer.warmup_steps == (2 if "trainer=debug" in overrides else 1000)
