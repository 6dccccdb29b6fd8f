"""translate.py refuses, before translating, settings that would lose data or mean something
other than what was typed: an empty path (``input=$SRC`` with SRC unset read stdin), an
``output=`` that is a file it reads (reference, checkpoint, tokenizer), a ref= with nothing
to score, a ckpt= folder that is no run, a picture folder holding an earlier translation's.

No model is trained: ``load_for_inference`` is replaced, so each test takes a fraction of a
second.
"""

import json
import os
from types import SimpleNamespace

import pytest

from transformer import translate_cli
from transformer.checkpoint import CheckpointError


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


def test_output_may_not_be_a_file_translating_reads(run, tmp_path):
    """output= the reference replaced it with the hypotheses after scoring; output= the
    checkpoint destroyed the model; a hard link to the input was not seen as the input."""
    (tmp_path / "ref.txt").write_text("A dog.\nTwo cats.\n", "utf-8")
    os.link(tmp_path / "in.txt", tmp_path / "linked.txt")
    for output, what in [
        ("ref.txt", "reference file"),
        ("model.pt", "checkpoint"),
        ("linked.txt", "input file"),
    ]:
        with pytest.raises(ValueError, match=f"{output} is the {what}: it would be overwritten"):
            run(f"ref={tmp_path / 'ref.txt'}", f"output={tmp_path / output}")
    with pytest.raises(Loaded):  # a new file, or one translating does not read, is fine
        run(f"ref={tmp_path / 'ref.txt'}", f"output={tmp_path / 'out.txt'}")


def test_output_may_not_be_the_tokenizer(run, tmp_path, monkeypatch):
    """The tokenizer is known once the checkpoint is read: refused then, before translating."""
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"")
    tok = SimpleNamespace(path=spm)
    loaded = (SimpleNamespace(), tok, tok, {"data": {"max_len": 10}})
    monkeypatch.setattr(translate_cli, "load_for_inference", lambda *a: loaded)
    with pytest.raises(ValueError, match="spm.model is the source tokenizer: it would be"):
        run(f"output={spm}")


def test_scoring_an_empty_input_is_one_clear_error(run, tmp_path):
    """An empty input and reference reached sacreBLEU: an IndexError traceback."""
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt and ref=.*empty.txt are empty: nothing to"):
        run(f"input={tmp_path / 'empty.txt'}", f"ref={tmp_path / 'empty.txt'}")


def test_a_folder_that_is_no_run_says_what_to_give(run, tmp_path):
    """ckpt=RUN/checkpoints was called an unfinished run whose RUN/checkpoints/checkpoints
    held no checkpoint; a folder of something else, the same."""
    ckpts = tmp_path / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.pt").write_bytes(b"")
    (tmp_path / "r" / "metrics.json").write_text(json.dumps({"final": {}}))
    with pytest.raises(
        CheckpointError,
        match=rf"folder of checkpoints: name one, e.g. ckpt={ckpts}/best.pt \(or the run folder",
    ):
        run(f"ckpt={ckpts}")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(CheckpointError, match="with neither metrics.json nor checkpoints/, not"):
        run(f"ckpt={tmp_path / 'tokenizer'}")


def test_a_picture_folder_of_an_earlier_translation_is_refused(run, tmp_path):
    """Its pictures stayed beside the new ones (a line blank now, or past the new input's
    end), numbered as if they were of this input."""
    plots = tmp_path / "plots"
    (plots / "0002").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds the pictures of an earlier translation \(0002\)"):
        run(f"attention_plot={plots}")
    (plots / "0002").rmdir()
    (plots / "2024_notes").mkdir()  # anything else in it is no picture of ours
    with pytest.raises(Loaded):
        run(f"attention_plot={plots}")


def test_output_may_not_be_where_the_pictures_go(run, tmp_path):
    """output= the attention_plot= folder (or a sentence folder in it) translated every
    line, drew the pictures, then failed to write the translations: Is a directory."""
    plots = tmp_path / "plots"
    for output in (plots, plots / "0001"):  # the folder still to be made; a sentence folder
        with pytest.raises(ValueError, match="is where attention_plot=.* puts its pictures"):
            run(f"output={output}", f"attention_plot={plots}")
        plots.mkdir(exist_ok=True)
    with pytest.raises(Loaded):  # a file beside the sentence folders is fine
        run(f"output={plots / 'out.txt'}", f"attention_plot={plots}")
