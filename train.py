"""Train a translation model: ``python train.py model=transformer data=multi30k ...``."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.cli import (
    busy_run_dir,
    check_added_keys,
    friendly_errors,
    override_error,
    refused_resume,
    run_dir_is_hydras,
    shared_sweep_run_dir,
    unwritable_run_dir,
)
from transformer.trainer import train

CONF = Path(__file__).parent / "conf"
# a model's and an optimizer's keyword arguments and decoding (checked where they are used:
# an unknown one fails before the data is read), and named splits
OPEN_UNDER = ("model", "decode", "trainer.optimizer", "data.hub_splits")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides.task
    check_added_keys(overrides, CONF, "train", OPEN_UNDER)
    train(cfg)


if __name__ == "__main__":
    sys.argv[1:] = argv = run_dir_is_hydras(sys.argv[1:])
    reason = (
        override_error(argv, CONF, "train", OPEN_UNDER)
        or shared_sweep_run_dir(argv)
        or busy_run_dir(argv)
        or refused_resume(argv, CONF)
        or unwritable_run_dir(argv)
    )
    if reason:
        sys.exit(f"error: {reason}")
    main()
