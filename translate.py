"""Translate with a trained run: ``python translate.py ckpt=RUN`` (or ckpt=RUN/checkpoints/best.pt).

Reads stdin (or ``input=FILE``) one sentence per line and writes one translation per line to
stdout (or ``output=FILE``), same count and order.
"""

import hydra
from omegaconf import DictConfig

from transformer.cli import friendly_errors
from transformer.translate_cli import translate


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    translate(cfg)


if __name__ == "__main__":
    main()
