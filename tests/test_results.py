"""Every committed BLEU figure is recomputable from the hypothesis file beside it."""

import functools
import gzip
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transformer.metrics import Scorer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "multi30k"
RUNS = sorted(p.parent for p in (ROOT / "results").glob("**/metrics.json"))


def run_id(run: Path) -> str:
    return str(run.relative_to(ROOT / "results"))


@functools.cache
def references(split: str, lang: str) -> Scorer:
    """A scorer against the split's references, built once: over a hundred hypothesis files
    are scored against the same few reference sets (score_all from scratch made this file
    take 219 s of the suite's 531)."""
    with gzip.open(DATA / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return Scorer(f.read().splitlines())


def assert_scored_by(hyp_file: Path, refs: Scorer, recorded: dict) -> None:
    """The recorded BLEU, chrF, lowercased BLEU, signature and size are those of hyp_file."""
    scores = refs.score_all(hyp_file.read_text("utf-8").splitlines())
    for key in ("bleu", "chrf", "bleu_lc", "bleu_signature", "sentences"):
        assert recorded[key] == scores[key], (str(hyp_file), key)


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/multi30k for references")
@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_metrics_json_matches_its_hypotheses(run):
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg["data"]["name"] == "multi30k"
    for split in ("valid", "test2016"):
        refs = references(split, cfg["data"]["tgt_lang"])
        assert_scored_by(run / f"{split}.hyp", refs, metrics[split])


def test_there_are_results_for_every_required_direction():
    found = {run_id(r) for r in RUNS}
    for required in (
        "multi30k-de-en/transformer",
        "multi30k-de-en/rnn",
        "multi30k-en-de/transformer",
        "multi30k-en-de/rnn",
        "multi30k-fr-en/transformer",
        "multi30k-cs-en/transformer",
    ):
        assert required in found


def kept_candidates(run: Path) -> list[dict]:
    """The trainer.final candidates whose valid hypotheses the run kept (older runs: none)."""
    final = json.loads((run / "metrics.json").read_text()).get("final", {})
    return [r for r in final.get("candidates", []) if "hypotheses" in r]


FINAL_RUNS = [r for r in RUNS if kept_candidates(r)]


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/multi30k for references")
@pytest.mark.parametrize("run", FINAL_RUNS, ids=run_id)
def test_final_candidates_match_their_hypotheses(run):
    """Every candidate the trainer weighed on valid (trainer.final) is scored by the file it
    names, and the chosen one's hypotheses are valid.hyp."""
    final = json.loads((run / "metrics.json").read_text())["final"]
    rows = kept_candidates(run)
    refs = references("valid", OmegaConf.load(run / "config.yaml")["data"]["tgt_lang"])
    for row in rows:
        hyps = (run / row["hypotheses"]).read_text("utf-8").splitlines()
        assert round(refs.bleu(hyps), 2) == row["valid_bleu"], row["hypotheses"]
    keys = ("checkpoint", "beam_size", "length_penalty")
    (chosen,) = [r for r in rows if all(r[k] == final[k] for k in keys)]
    assert (run / chosen["hypotheses"]).read_text("utf-8") == (run / "valid.hyp").read_text("utf-8")


DECODES = sorted(p.parent for p in (ROOT / "results" / "decode").glob("*/results.json"))


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/multi30k for references")
@pytest.mark.parametrize("table", DECODES, ids=run_id)
def test_decode_tables_match_their_hypotheses(table):
    """Every row of a `python -m transformer.evaluate` table (results/decode/) is scored by
    the hypothesis file it names, relative to the table's folder, against the references of
    its direction (tables written before evaluate recorded it are all Multi30k de->en)."""
    for row in json.loads((table / "results.json").read_text()):
        assert row.get("data", "multi30k") == "multi30k"
        refs = references(row["split"], row.get("tgt_lang", "en"))
        assert_scored_by(table / row["hypotheses"], refs, row)


# A column of a results table in these pages, and the metrics.json figure it must equal.
TABLE_COLUMNS = {
    "valid BLEU": ("valid", "bleu"),
    "test2016 BLEU": ("test2016", "bleu"),
    "chrF": ("test2016", "chrf"),
    "BLEU, lowercased": ("test2016", "bleu_lc"),
}
TABLE_PAGES = [ROOT / "README.md", ROOT / "results" / "ablations.md"]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def linked_run(page: Path, row: list[str]) -> Path | None:
    """The run folder a table row links: a folder with metrics.json, or a file in one."""
    for target in re.findall(r"\]\(([^)#\s]+)", " ".join(row)):
        path = (page.parent / target).resolve()
        run = path if path.is_dir() else path.parent
        if (run / "metrics.json").is_file():
            return run
    return None


def results_table_rows(page: Path):
    """(line number, {column: cell}, run folder) of every row that links a run, in every
    table of the page with a test2016 BLEU column."""
    lines = page.read_text("utf-8").splitlines()
    for i, line in enumerate(lines[:-1]):
        header = cells(line)
        if not (line.startswith("|") and "test2016 BLEU" in header):
            continue
        assert lines[i + 1].startswith("|---"), f"{page.name}:{i + 1}: table without a rule"
        for j in range(i + 2, len(lines)):
            if not lines[j].startswith("|"):
                break
            row = cells(lines[j])
            assert len(row) == len(header), (
                f"{page.name}:{j + 1}: {len(row)} cells, header has {len(header)}"
            )
            run = linked_run(page, row)
            if run is not None:
                yield j + 1, dict(zip(header, row)), run


@pytest.mark.parametrize("page", TABLE_PAGES, ids=lambda p: p.name)
def test_results_tables_quote_their_runs_metrics(page):
    """BLEU and chrF in the README's and ablations.md's results tables are the figures of the
    run each row links (metrics.json, itself recomputed from the hypotheses above)."""
    checked = 0
    for line, row, run in results_table_rows(page):
        metrics = json.loads((run / "metrics.json").read_text())
        for column, (split, key) in TABLE_COLUMNS.items():
            if row.get(column, "") not in ("", "-"):
                cell = row[column].strip("*")
                assert cell == f"{metrics[split][key]:.2f}", f"{page.name}:{line}: {column}"
                checked += 1
    assert checked >= 20, f"{page.name}: only {checked} figures found in its results tables"
