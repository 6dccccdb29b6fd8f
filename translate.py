"""Translate with a trained run: ``python translate.py ckpt=RUN`` (or ckpt=RUN/checkpoints/best.pt).

Reads stdin (or ``input=FILE``) one sentence per line and writes one translation per line to
stdout (or ``output=FILE``), same count and order.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transformer.cli import check_added_keys, friendly_errors, unparsable_override
from transformer.translate_cli import translate

CONF = Path(__file__).parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    open_under = ("decode",)  # checked by decode_options, which names the key
    overrides = HydraConfig.get().overrides.task
    check_added_keys(overrides, CONF, "translate", open_under)
    translate(cfg)


if __name__ == "__main__":
    if reason := unparsable_override(sys.argv[1:], CONF):
        sys.exit(f"error: {reason}")
    main()
