"""The end-of-training translations: best.pt or the average of the last checkpoints, and
the length penalty, chosen on the validation split; test is decoded once, with the choice."""

import json

import pytest
import torch

from transformer import checkpoint, final_choice
from transformer.checkpoint import CheckpointError
from transformer.evaluate import decode_setting
from transformer.final_choice import FinalChoice
from transformer.metrics import bleu
from transformer.trainer import Trainer, TrainingError, train
from transformer.translate_cli import translate
from transformer.translator import encode_sources, load_for_inference, translate_ids

# the default length penalties (trainer=debug tries none besides decode's)
RUN = ["trainer.max_steps=9", "trainer.keep_checkpoints=3", "trainer.final.average_last=3",
       "trainer.final.length_penalties=[1.0,1.4]"]  # fmt: skip


def decode_with(ckpt, lines, length_penalty, beam_size=5, max_len_b=10):
    model, src_tok, tgt_tok, cfg = load_for_inference(ckpt, torch.device("cpu"))
    _, decode = decode_setting(
        f"beam:beam_size={beam_size},length_penalty={length_penalty},max_len_b={max_len_b}"
    )
    ids = encode_sources(lines, src_tok, cfg["data"]["max_len"])
    nbest = translate_ids(model, ids, tgt_tok, decode, torch.device("cpu"))
    return tgt_tok.decode([hyps[0][0] if hyps else [] for hyps in nbest])


def test_every_candidate_is_scored_on_valid_and_the_best_one_wins(
    compose, small_overrides, tmp_path, corpus_root
):
    metrics = train(compose(small_overrides + RUN + ["trainer.final.beam_sizes=[2]"]))
    run = tmp_path / "run"
    final = metrics["final"]
    rows = final["candidates"]
    assert [(r["checkpoint"], r["beam_size"], r["length_penalty"]) for r in rows] == [
        (c, k, a)
        for c in ("checkpoints/best.pt", "checkpoints/avg_last3.pt")
        for k in (5, 2)
        for a in (0.6, 1.0, 1.4)
    ]
    assert rows[6]["averaged_steps"] == [9, 6, 3]
    refs = (corpus_root / "multi30k" / "valid.en").read_text("utf-8").splitlines()
    scores = []  # unrounded: candidates whose rounded scores tie may still differ
    for r in rows:  # every candidate's score is recomputable from the file it names
        hyps = (run / r["hypotheses"]).read_text("utf-8").splitlines()
        scores.append(bleu(hyps, refs)[0])
        assert round(scores[-1], 2) == r["valid_bleu"], r["hypotheses"]
    first_top = rows[scores.index(max(scores))]  # exact ties: the earlier row
    assert final["checkpoint"] == first_top["checkpoint"]
    for key in ("beam_size", "length_penalty"):
        assert final[key] == first_top[key] == metrics["decode"][key], key
    assert final["chosen_on"] == "valid" and metrics["valid"]["bleu"] == first_top["valid_bleu"]
    assert json.loads((run / "metrics.json").read_text())["final"] == final
    assert (run / first_top["hypotheses"]).read_text("utf-8") == (run / "valid.hyp").read_text(
        "utf-8"
    )
    assert rows[0]["hypotheses"] == "final/valid.best.beam5.lp0.6.hyp"
    # Test is translated by the winner's weights, reloaded when another candidate came last.
    sources = (corpus_root / "multi30k" / "test2016.de").read_text("utf-8").splitlines()
    winner = decode_with(
        run / final["checkpoint"], sources, final["length_penalty"], final["beam_size"]
    )
    assert (run / "test2016.hyp").read_text("utf-8").splitlines() == winner

    # The average on disk is the mean of the three step checkpoints it names.
    avg = checkpoint.load(run / "checkpoints" / "avg_last3.pt")["model"]
    steps = [checkpoint.load(p)["model"] for p in checkpoint.step_checkpoints(run / "checkpoints")]
    mean = sum(s["out_proj.weight"].double() for s in steps) / 3
    torch.testing.assert_close(avg["out_proj.weight"].double(), mean, rtol=0, atol=1e-6)


def rig_valid_scores(monkeypatch, winner: int):
    """During the final choice, candidate row ``winner`` (0-based, in the order tried) scores
    1 on valid and every other row 0; BLEU during training (trainer.bleu) stays real."""
    real, rows_scored = final_choice.bleu, []

    def rigged_bleu(hyps, refs, **kw):
        score, sig = real(hyps, refs, **kw)
        rows_scored.append(1)
        return float(len(rows_scored) - 1 == winner), sig

    monkeypatch.setattr(final_choice, "bleu", rigged_bleu)
    return real


def test_the_chosen_weights_and_penalty_translate_test(
    compose, small_overrides, tmp_path, corpus_root, monkeypatch
):
    """With validation scores rigged so that the last candidate (the average, length penalty
    1.4) wins, test2016.hyp and valid.hyp are exactly its translations."""
    real = rig_valid_scores(monkeypatch, winner=5)
    metrics = train(compose(small_overrides + RUN + ["decode.max_len_b=3"]))  # not the default
    run = tmp_path / "run"
    assert metrics["final"]["checkpoint"] == "checkpoints/avg_last3.pt"
    assert metrics["final"]["length_penalty"] == 1.4
    avg = run / "checkpoints" / "avg_last3.pt"
    for split in ("valid", "test2016"):
        sources = (corpus_root / "multi30k" / f"{split}.de").read_text("utf-8").splitlines()
        expected = decode_with(avg, sources, 1.4, max_len_b=3)
        assert (run / f"{split}.hyp").read_text("utf-8").splitlines() == expected, split
        refs = (corpus_root / "multi30k" / f"{split}.en").read_text("utf-8").splitlines()
        assert metrics[split]["bleu"] == round(real(expected, refs)[0], 2)
    # best.pt with its own penalty would have translated test otherwise.
    assert decode_with(run / "checkpoints" / "best.pt", sources, 0.6, max_len_b=3) != expected

    # translate.py ckpt=RUN gives the run's test translations (with the run's max_len_b too:
    # it took only the beam size and length penalty); a setting on the command line wins.
    src = corpus_root / "multi30k" / "test2016.de"
    as_run = [f"ckpt={run}", f"input={src}", "device=cpu"]
    assert translate(compose(as_run, name="translate"), overrides=as_run) == expected
    mine = [*as_run, "decode.length_penalty=0.6", "decode.max_len_b=10"]
    assert translate(compose(mine, name="translate"), overrides=mine) == decode_with(
        avg, sources, 0.6
    )
    assert decode_with(avg, sources, 1.4) != expected  # max_len_b=3 cuts some short


def test_an_earlier_winner_is_loaded_again_for_test(
    compose, small_overrides, tmp_path, corpus_root, monkeypatch
):
    """best.pt at length penalty 1.4 wins although the average was decoded after it: test
    is translated with best.pt's weights, not with the average's still in memory."""
    rig_valid_scores(monkeypatch, winner=2)
    metrics = train(compose(small_overrides + RUN))
    run = tmp_path / "run"
    assert metrics["final"]["checkpoint"] == "checkpoints/best.pt"
    assert metrics["final"]["length_penalty"] == 1.4
    sources = (corpus_root / "multi30k" / "test2016.de").read_text("utf-8").splitlines()
    expected = decode_with(run / "checkpoints" / "best.pt", sources, 1.4)
    assert (run / "test2016.hyp").read_text("utf-8").splitlines() == expected
    assert decode_with(run / "checkpoints" / "avg_last3.pt", sources, 1.4) != expected


def test_the_weights_training_ended_with_are_loaded_again_when_they_win(
    compose, small_overrides, tmp_path, corpus_root, monkeypatch
):
    """Without best.pt (here deleted before the choice, as a damaged or removed file would
    be) the candidates are the weights in memory and the average: when the former win, test
    is translated with them, not with the average decoded after them."""
    rig_valid_scores(monkeypatch, winner=0)
    candidates = FinalChoice.candidates

    def without_best_pt(self):
        (self.trainer.ckpt_dir / "best.pt").unlink()
        return candidates(self)

    monkeypatch.setattr(FinalChoice, "candidates", without_best_pt)
    metrics = train(compose(small_overrides + RUN))
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "best.pt").exists()
    assert [r["checkpoint"] for r in metrics["final"]["candidates"]][::3] == [
        None,
        "checkpoints/avg_last3.pt",
    ]
    assert metrics["final"]["checkpoint"] is None
    sources = (corpus_root / "multi30k" / "test2016.de").read_text("utf-8").splitlines()
    expected = decode_with(run / "checkpoints" / "last.pt", sources, 0.6)
    assert (run / "test2016.hyp").read_text("utf-8").splitlines() == expected
    assert decode_with(run / "checkpoints" / "avg_last3.pt", sources, 0.6) != expected


def test_without_candidates_nothing_is_chosen(compose, small_overrides, tmp_path):
    metrics = train(compose(small_overrides + ["decode=greedy", "trainer.final.average_last=0"]))
    assert metrics["final"] == {
        "checkpoint": "checkpoints/best.pt",
        "step": metrics["best_step"],
        "beam_size": 1,  # decode=greedy
        "length_penalty": 0.0,
        "chosen_on": None,
    }
    assert not list((tmp_path / "run" / "checkpoints").glob("avg_*.pt"))


def test_the_average_candidate_is_of_the_newest_average_last_step_files(
    compose, small_overrides, tmp_path
):
    """trainer.final.average_last=2 with three step files kept averages the newest two
    (steps 9 and 6), and so with exactly two; a single step file is no average. (Every
    other run here keeps exactly as many step files as it averages.)"""
    kept = ["trainer.max_steps=9", "trainer.keep_checkpoints=3", "trainer.bleu_every=1000"]
    cfg = compose(small_overrides + kept + ["trainer.final.average_last=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.run()  # step files 3, 6 and 9
    ckpts = tmp_path / "run" / "checkpoints"
    average = ckpts / "avg_last2.pt"
    for steps in ([9, 6, 3], [9, 6]):
        assert [int(p.stem[5:]) for p in checkpoint.step_checkpoints(ckpts)] == steps
        assert FinalChoice(trainer).candidates() == [ckpts / "best.pt", average]
        assert [s["step"] for s in checkpoint.load(average)["averaged_from"]] == [9, 6]
        average.unlink()
        checkpoint.step_checkpoints(ckpts)[-1].unlink()
    assert FinalChoice(trainer).candidates() == [ckpts / "best.pt"]  # step 9's file alone
    assert not average.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.final.average_last=-1", "trainer.final.average_last must be an integer >= 0"),
        ("trainer.final.length_penalties=1.0", "trainer.final.length_penalties must be a list"),
        ("trainer.final.length_penalties=[a]", "trainer.final.length_penalties must be a list"),
        ("trainer.final.beam_sizes=[2.5]", "trainer.final.beam_sizes must be a list of integers"),
        ("trainer.final.beam_sizes=[0]", "trainer.final.beam_sizes must be >= 1"),
        # they said "decode.length_penalty must be a number >= 0", of a decode.* that was fine
        ("trainer.final.length_penalties=[-1]", "trainer.final.length_penalties must be >= 0"),
    ],
)
def test_bad_final_settings_fail_before_training(compose, small_overrides, override, message):
    with pytest.raises(TrainingError, match=message):
        train(compose(small_overrides + [override]))


def test_translating_an_unfinished_run_folder_is_one_clear_error(compose, tmp_path):
    """The error suggests a checkpoint the folder holds, or says that it holds none."""
    (tmp_path / "checkpoints").mkdir()
    cfg = compose([f"ckpt={tmp_path}", "device=cpu"], name="translate")
    with pytest.raises(CheckpointError, match="folder without metrics.json.*holds no checkpoint"):
        translate(cfg, overrides=[])
    (tmp_path / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="e.g. ckpt=.*step_00000004.pt$"):
        translate(cfg, overrides=[])
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="e.g. ckpt=.*best.pt$"):
        translate(cfg, overrides=[])


def test_a_run_from_before_the_choice_translates_with_best_pt(tmp_path):
    from transformer.translate_cli import run_choice

    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best.pt", "avg_last5.pt", "step_6.pt"):
        (run / "checkpoints" / name).touch()
    (run / "metrics.json").write_text(json.dumps({"steps": 6, "decode": {"beam_size": 5}}))
    decode = {"beam_size": 5, "length_penalty": 0.6}
    assert run_choice(run, decode, []) == run / "checkpoints" / "best.pt"
    assert decode == {"beam_size": 5, "length_penalty": 0.6}
    # the run's other decoding settings too, unless given; none under decode=NAME
    used = {"beam_size": 4, "length_penalty": 1.0, "max_len_b": 4, "min_len": 2}
    final = {"checkpoint": "checkpoints/best.pt", "beam_size": 4, "length_penalty": 1.0}
    (run / "metrics.json").write_text(json.dumps({"final": final, "decode": used}))
    decode = {"beam_size": 5, "length_penalty": 0.6, "max_len_b": 10, "min_len": 0}
    run_choice(run, decode, ["decode.min_len=1"])
    assert decode == {"beam_size": 4, "length_penalty": 1.0, "max_len_b": 4, "min_len": 0}
    greedy = {"beam_size": 1, "length_penalty": 0.0, "max_len_b": 10}
    run_choice(run, greedy, ["decode=greedy"])
    assert greedy == {"beam_size": 1, "length_penalty": 0.0, "max_len_b": 10}
    decode = {"beam_size": 5, "length_penalty": 0.6}
    final = {"checkpoint": "checkpoints/avg_last5.pt", "beam_size": 10, "length_penalty": 1.4}
    (run / "metrics.json").write_text(json.dumps({"final": final}))
    assert run_choice(run, decode, []) == run / "checkpoints" / "avg_last5.pt"
    assert decode == {"beam_size": 10, "length_penalty": 1.4}
    greedy = {"beam_size": 1, "length_penalty": 0.0}
    assert run_choice(run, greedy, ["decode=greedy"]).name == "avg_last5.pt"
    assert greedy == {"beam_size": 1, "length_penalty": 0.0}  # the user's decoding kept
    for given in ("decode.beam_size=3", "+decode.beam_size=3", "++decode.beam_size=3"):
        decode = {"beam_size": 3, "length_penalty": 0.6}  # Hydra's prefixes name the same key
        run_choice(run, decode, [given])
        assert decode == {"beam_size": 3, "length_penalty": 1.4}, given
    # the chosen file deleted since: said, with the file that chose it and one still there
    (run / "checkpoints" / "avg_last5.pt").unlink()
    with pytest.raises(CheckpointError, match=(
        rf"^ckpt={run}: {run}/checkpoints/avg_last5.pt is gone, and {run}/metrics.json chose "
        rf"it on valid \(final.checkpoint\); name another, e.g. ckpt={run}/checkpoints/best.pt$"
    )):  # fmt: skip
        run_choice(run, decode, [])
    (run / "metrics.json").write_text("{}")
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(
        CheckpointError, match="best.pt is gone, .* names no final choice; .*step_6"
    ):
        run_choice(run, decode, [])
    (run / "metrics.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a metrics file"):
        run_choice(run, decode, [])
    (run / "metrics.json").write_text('{"final": "x"}')  # was an AttributeError traceback
    with pytest.raises(CheckpointError, match="its 'final' is not a mapping, got 'x'"):
        run_choice(run, decode, [])


def test_translating_a_run_into_its_own_metrics_json_is_refused(compose, tmp_path):
    """ckpt=RUN output=RUN/metrics.json wrote the translations over the file that chose the
    checkpoint: the run's results were gone, and the next ckpt=RUN failed on them."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    final = {"checkpoint": "checkpoints/best.pt", "beam_size": 5, "length_penalty": 0.6}
    (run / "metrics.json").write_text(json.dumps({"final": final}))
    (tmp_path / "in.txt").write_text("Ein Hund.\n", "utf-8")
    args = [f"ckpt={run}", f"input={tmp_path / 'in.txt'}", f"output={run / 'metrics.json'}"]
    cfg = compose([*args, "device=cpu"], name="translate")
    with pytest.raises(ValueError, match="metrics.json is the run's metrics.json: it would be"):
        translate(cfg, overrides=[])
    assert json.loads((run / "metrics.json").read_text())["final"] == final
