"""Shared fixtures: offline Hub, a small Multi30k-shaped corpus, Hydra compose."""

import csv
import gzip
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared" / "data" / "multi30k"
SIZES = {"train": 300, "valid": 40, "test2016": 40}


def read_head(split: str, lang: str, n: int) -> list[str]:
    with gzip.open(SHARED / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def synthetic(split: str, lang: str, n: int) -> list[str]:
    words = {
        "de": ["ein", "hund", "läuft", "im", "park", "zwei", "kinder", "spielen"],
        "en": ["a", "dog", "runs", "in", "the", "park", "two", "children", "play"],
    }[lang]
    offset = {"train": 0, "valid": 7, "test2016": 13}[split]
    return [
        " ".join(words[(i * 3 + j + offset) % len(words)] for j in range(3 + i % 6)) + "."
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> Path:
    """A data root holding multi30k/{split}.{de,en}: the first lines of the real corpus when
    ../shared/data is there, else synthetic sentences."""
    root = tmp_path_factory.mktemp("data")
    (root / "multi30k").mkdir()
    for split, n in SIZES.items():
        for lang in ("de", "en"):
            lines = read_head(split, lang, n) if SHARED.is_dir() else synthetic(split, lang, n)
            (root / "multi30k" / f"{split}.{lang}").write_text("\n".join(lines) + "\n", "utf-8")
    return root


@pytest.fixture()
def compose():
    """compose(overrides) -> the train config as train.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides=(), name="train"):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return hydra_compose(name, overrides=list(overrides))

    return _compose


def tiny_run(corpus_root: Path, where: Path) -> list[str]:
    """Overrides for a tiny, fast run (d32, one layer each side, trainer=debug) on the small
    corpus, with its cache and run folder under ``where``."""
    return [
        f"data.data_dir={corpus_root}",
        f"data.cache_dir={where / 'cache'}",
        "data.vocab_size=300",
        "trainer=debug",
        "model.d_model=32",
        "model.n_heads=2",
        "model.d_ff=64",
        "model.n_enc_layers=1",
        "model.n_dec_layers=1",
        f"run_dir={where / 'run'}",
        "device=cpu",
    ]


@pytest.fixture()
def small_overrides(corpus_root, tmp_path):
    """Overrides for a tiny, fast run on the small corpus under tmp_path."""
    return tiny_run(corpus_root, tmp_path)


def train_tiny(corpus_root: Path, where: Path, *extra: str) -> Path:
    """Train a ``tiny_run`` under ``where`` with the ``extra`` overrides, outside any
    function-scoped fixture (for fixtures that train once per module or session); returns
    its run folder."""
    from hydra import compose, initialize_config_dir

    from transformer.trainer import train

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        train(compose("train", overrides=[*tiny_run(corpus_root, where), *extra]))
    return where / "run"


@pytest.fixture(scope="session")
def tiny_ckpt(corpus_root, tmp_path_factory) -> Path:
    """best.pt of a 6-step d32 Transformer trained once per session (data.max_len=24)."""
    tmp = tmp_path_factory.mktemp("tiny")
    run = train_tiny(corpus_root, tmp, "data.max_len=24")  # long inputs get truncated
    return run / "checkpoints" / "best.pt"


@pytest.fixture()
def read_csv():
    """read_csv(path, *fields) -> one tuple of those fields per row of a run's CSV log."""

    def _read(path: Path, *fields) -> list[tuple]:
        with open(path, newline="") as f:
            return [tuple(row[k] for k in fields) for row in csv.DictReader(f)]

    return _read


@pytest.fixture()
def logged_steps(read_csv):
    """logged_steps(path) -> the ``step`` of each row of a run's CSV log, as ints."""

    def _steps(path: Path) -> list[int]:
        return [int(step) for (step,) in read_csv(path, "step")]

    return _steps


@pytest.fixture()
def last_logged_step(logged_steps):
    """last_logged_step(path) -> the step of a CSV log's last row, or 0 while the file is
    missing or being written (for polling a trainer that runs in another process; a row
    cut short reads as a smaller step or as 0)."""

    def _last(path: Path) -> int:
        try:
            return logged_steps(path)[-1]
        except (FileNotFoundError, IndexError, KeyError, TypeError, ValueError):
            return 0

    return _last


@pytest.fixture()
def typed(monkeypatch):
    """typed(*lines): input() returns these lines in turn, then raises EOFError (Ctrl-D at the
    prompt)."""

    def _typed(*lines: str) -> None:
        pending = iter(lines)

        def fake_input(prompt):
            try:
                return next(pending)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)

    return _typed
