"""python -m transformer.average: the mean of the last N step checkpoints, usable by translate."""

import os
import shutil

import pytest
import torch
from conftest import train_tiny

from transformer import checkpoint
from transformer.average import average, main
from transformer.trainer import train
from transformer.translator import load_for_inference


@pytest.fixture(scope="module")
def run(corpus_root, tmp_path_factory):
    """A 9-step run with step checkpoints at 3, 6 and 9, trained once for this module (the
    tests add averaged or altered copies beside them, never another step checkpoint)."""
    where = tmp_path_factory.mktemp("average")
    return train_tiny(corpus_root, where, "trainer.max_steps=9", "trainer.keep_checkpoints=3")


def test_average_of_the_last_three_is_their_mean_and_translates(run):
    steps = checkpoint.step_checkpoints(run / "checkpoints")
    assert [p.name for p in steps] == [f"step_{s:08d}.pt" for s in (9, 6, 3)]
    assert main([str(run), "--last", "3"]) == 0
    avg = checkpoint.load(run / "checkpoints" / "avg_last3.pt")
    assert [s["step"] for s in avg["averaged_from"]] == [9, 6, 3]
    states = [checkpoint.load(p)["model"] for p in steps]
    for name, tensor in avg["model"].items():
        expected = sum(s[name].double() for s in states) / 3
        assert tensor.dtype == states[0][name].dtype
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=0, atol=1e-6)
    assert not torch.equal(avg["model"]["out_proj.weight"], states[0]["out_proj.weight"])
    model, *_ = load_for_inference(run / "checkpoints" / "avg_last3.pt", torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_last_two_are_the_newest_two(run):
    assert main([str(run), "--last", "2"]) == 0
    avg = checkpoint.load(run / "checkpoints" / "avg_last2.pt")
    assert [s["step"] for s in avg["averaged_from"]] == [9, 6]


def test_averaging_one_checkpoint_changes_nothing(run):
    one = checkpoint.step_checkpoints(run / "checkpoints")[0]
    avg = average([one])
    for name, tensor in checkpoint.load(one)["model"].items():
        assert torch.equal(avg["model"][name], tensor), name


def test_too_few_checkpoints_or_another_model_is_one_clear_line(
    run, compose, small_overrides, tmp_path, capsys
):
    assert main([str(run), "--last", "5"]) == 1
    assert "holds 3 step checkpoint(s), fewer than --last 5" in capsys.readouterr().err
    other = tmp_path / "other"
    train(compose(small_overrides + ["model.d_model=64", f"run_dir={other}"]))
    capsys.readouterr()  # its own cache: the encoding's progress bars
    mixed = [str(run / "checkpoints" / "last.pt"), str(other / "checkpoints" / "last.pt")]
    assert main([*mixed, "--out", str(run / "checkpoints" / "mixed.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "differ" in err
    assert not (run / "checkpoints" / "mixed.pt").exists()


def test_checkpoints_with_other_tokenizers_are_not_averaged(run, capsys):
    """The same model shape with another vocabulary's ids would average unrelated rows."""
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    last["tokenizer"] = {**last["tokenizer"], "tgt_sha256": "0" * 64}
    checkpoint.save(run / "checkpoints" / "other.pt", last)
    inputs = [str(run / "checkpoints" / name) for name in ("last.pt", "other.pt")]
    assert main([*inputs, "--out", str(run / "checkpoints" / "avg.pt")]) == 1
    assert "its tokenizer differs" in capsys.readouterr().err


def test_the_average_carries_the_newest_inputs_progress(run):
    """Whatever the order given, the step that evaluate and the final choice report is the
    newest input's (it was the first file's), and every input is listed with its step."""
    by_step = {
        checkpoint.load(p)["progress"]["step"]: p
        for p in checkpoint.step_checkpoints(run / "checkpoints")
    }
    avg = average([by_step[3], by_step[9], by_step[6]])
    newest = checkpoint.load(by_step[9])
    assert avg["progress"] == newest["progress"] and avg["config"] == newest["config"]
    assert avg["averaged_from"] == [{"file": str(by_step[s]), "step": s} for s in (3, 9, 6)]


@pytest.mark.parametrize(
    "out, message",
    [
        ("last.pt", "the trainer writes its own checkpoints as last.pt"),
        ("best.pt", "the trainer writes its own checkpoints as best.pt"),
        ("step_00000012.pt", "the trainer writes its own checkpoints as step_00000012.pt"),
        ("step_00000006.pt", "the trainer writes its own checkpoints as step_00000006.pt"),
        ("mine.pt", "--out {ckpts}/mine.pt is the input {ckpts}/step_00000003.pt"),  # a link
        ("", "--out {ckpts} is a folder"),
    ],
)
def test_out_replaces_no_input_and_no_file_of_the_trainer(run, capsys, out, message):
    """An average has no optimizer state: over last.pt or a step file a resume would fail,
    over an input (by any name: a hard link too) its weights would be lost."""
    ckpts = run / "checkpoints"
    (ckpts / "mine.pt").unlink(missing_ok=True)
    os.link(ckpts / "step_00000003.pt", ckpts / "mine.pt")
    target = ckpts / out
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts.iterdir()}
    inputs = [str(ckpts / "step_00000006.pt"), str(ckpts / "step_00000003.pt")]
    assert main([*inputs, "--out", str(target)]) == 1
    assert message.format(ckpts=ckpts) in capsys.readouterr().err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts.iterdir()} == before


@pytest.mark.parametrize(
    "inputs, message",
    [
        (["step_00000003.pt", "step_00000003.pt"], "{0} and {1} are the same checkpoint file"),
        (["last.pt", "step_00000009.pt"], "{0} and {1} are the same checkpoint file"),  # links
        (["copy.pt", "step_00000009.pt"], "{0} and {1} are both step 9 of one run"),
        (["step_00000003.pt", "avg_last3.pt"], "{1} is an average of 3 checkpoints"),
    ],
)
def test_each_checkpoint_counts_once(run, capsys, inputs, message):
    """A checkpoint given twice, by the same name, by a hard link (last.pt is the newest
    step_N.pt) or as a copy, would weigh double; an average's inputs would weigh again."""
    ckpts = run / "checkpoints"
    assert os.path.samefile(ckpts / "last.pt", ckpts / "step_00000009.pt")
    (ckpts / "twice.pt").unlink(missing_ok=True)
    shutil.copy(ckpts / "step_00000009.pt", ckpts / "copy.pt")
    checkpoint.save(ckpts / "avg_last3.pt", average(checkpoint.step_checkpoints(ckpts)))
    paths = [str(ckpts / name) for name in inputs]
    assert main([*paths, "--out", str(ckpts / "twice.pt")]) == 1
    assert message.format(*paths) in capsys.readouterr().err
    assert not (ckpts / "twice.pt").exists()


def test_a_checkpoints_folder_points_to_its_run(run, capsys):
    assert main([str(run / "checkpoints")]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints'} is a checkpoints/ folder; give its run folder {run}" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "no such run directory or checkpoint file: {missing}"),
        (["{here}", "--last", "0"], "--last must be at least 1, got 0"),
        (["{here}", "{up}", "--out", "{here}/a.pt"], "folders among several inputs: {here}, {up}"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    """A missing input is named (it was reported as a missing --out); --last below 1 was
    'no checkpoints to average'; several run folders were 'checkpoint not found'."""
    fill = {"missing": str(tmp_path / "nope"), "here": str(tmp_path), "up": str(tmp_path.parent)}
    with pytest.raises(SystemExit):
        main([a.format(**fill) for a in args])
    assert message.format(**fill) in capsys.readouterr().err
