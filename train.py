"""Train a translation model: ``python train.py model=transformer data=multi30k ...``."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.cli import (
    check_added_keys,
    friendly_errors,
    unparsable_override,
    unwritable_run_dir,
)
from transformer.trainer import train

CONF = Path(__file__).parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> None:
    # a model's and an optimizer's keyword arguments and decoding (checked where they are
    # used: an unknown one fails before the data is read), and named splits
    open_under = ("model", "decode", "trainer.optimizer", "data.hub_splits")
    overrides = HydraConfig.get().overrides.task
    check_added_keys(overrides, CONF, "train", open_under)
    train(cfg)


if __name__ == "__main__":
    if reason := unparsable_override(sys.argv[1:], CONF) or unwritable_run_dir(sys.argv[1:]):
        sys.exit(f"error: {reason}")
    main()
