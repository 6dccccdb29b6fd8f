"""trainer.cpu_malloc_reuse: glibc keeps freed memory, so a step's fresh tensors do not fault."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parent.parent

# A step-like pattern: tensors of 4-64 MB held together, then freed, 20 times; prints the
# minor page faults per round.
ROUNDS = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from transformer.host_memory import reuse_freed_memory
    assert reuse_freed_memory()
x = torch.randn(1 << 20)
def round_():
    held = [x.repeat(k) for k in (4, 1, 16, 2, 8)]
    del held
round_()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    def faults(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=ROOT, check=True,
                             capture_output=True, text=True)  # fmt: skip
        return float(run.stdout)

    pages = 31 * (4 << 20) // 4096  # each round writes 124 MiB: ~31,700 fresh 4 KiB pages
    reused, default = faults("reuse"), faults("default")
    assert reused < pages / 10, (reused, default)
    assert reused < default / 5, (reused, default)


def test_bad_setting_names_the_key(compose, small_overrides, tmp_path):
    cfg = compose([*small_overrides, "trainer.cpu_malloc_reuse=sometimes"])
    with pytest.raises(TrainingError, match=r"trainer\.cpu_malloc_reuse must be true or false"):
        Trainer(cfg, tmp_path / "run")


@pytest.mark.parametrize("reuse", [True, False])
def test_the_trainer_applies_the_setting_on_the_cpu(
    compose, small_overrides, tmp_path, monkeypatch, reuse
):
    """The trainer calls ``reuse_freed_memory`` on the CPU when the setting is on, and not
    when it is off (a trainer that never called it passed the tests above)."""
    from transformer import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_memory", lambda: calls.append(1) or True)
    Trainer(compose([*small_overrides, f"trainer.cpu_malloc_reuse={reuse}"]), tmp_path / "r")
    assert calls == ([1] if reuse else [])
