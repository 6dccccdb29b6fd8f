"""Train a translation model: ``python train.py model=transformer data=multi30k ...``."""

import hydra
from omegaconf import DictConfig

from transformer.cli import friendly_errors
from transformer.trainer import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
