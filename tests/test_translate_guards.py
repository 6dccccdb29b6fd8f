"""translate.py refuses, before translating, settings that would lose data or mean something
other than what was typed: an empty path (``input=$SRC`` with SRC unset read stdin), an
``output=`` that is a file it reads (reference, checkpoint, tokenizer), a ref= with nothing
to score, a ckpt= folder that is no run, a picture folder holding an earlier translation's.

No model is trained: ``load_for_inference`` is replaced, so each test takes a fraction of a
second.
"""

import pytest

from transformer import translate_cli


class Loaded(Exception):
    """Raised by the stand-in loader: the checks before loading the model all passed."""


@pytest.fixture()
def run(compose, tmp_path, monkeypatch):
    """run(*overrides): translate with a stand-in checkpoint file and an input of two lines;
    the model is never loaded (``Loaded`` says that it would have been)."""

    def refuse(*args):
        raise Loaded

    monkeypatch.setattr(translate_cli, "load_for_inference", refuse)
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "in.txt").write_text("Ein Hund.\nZwei Katzen.\n", "utf-8")

    def _run(*overrides):
        base = [f"ckpt={tmp_path / 'model.pt'}", f"input={tmp_path / 'in.txt'}", "device=cpu"]
        cfg = compose([*base, *overrides], name="translate")
        return translate_cli.translate(cfg, overrides=[])

    return _run


@pytest.mark.parametrize("key", ["ckpt", "input", "output", "ref", "attention_plot"])
def test_an_empty_path_is_refused_naming_its_key(run, key):
    """input= read stdin, output= wrote stdout, ref= scored nothing, attention_plot= drew
    nothing, ckpt= looked for a run in the working directory: each without a word."""
    with pytest.raises(ValueError, match=f"^{key}= is empty: name "):
        run(f"{key}=")
