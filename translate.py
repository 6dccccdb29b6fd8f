"""Translate with a trained run: ``python translate.py ckpt=RUN`` (or ckpt=RUN/checkpoints/best.pt).

Reads stdin (or ``input=FILE``) one sentence per line and writes one translation per line to
stdout (or ``output=FILE``), same count and order.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.cli import check_added_keys, friendly_errors, override_error
from transformer.translate_cli import translate

CONF = Path(__file__).parent / "conf"
OPEN_UNDER = ("decode",)  # checked by decode_options, which names the key


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides.task
    check_added_keys(overrides, CONF, "translate", OPEN_UNDER)
    translate(cfg)


if __name__ == "__main__":
    if reason := override_error(sys.argv[1:], CONF, "translate", OPEN_UNDER):
        sys.exit(f"error: {reason}")
    main()
