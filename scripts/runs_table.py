"""Markdown table of finished runs from their metrics.json, one row each.

    python scripts/runs_table.py results/attention/kinds/*/
    python scripts/runs_table.py --final results/gpu/h200-recipe/*/

Columns: updates, training seconds and target tokens/s (as the run measured them), best
validation BLEU during training (greedy), and BLEU/chrF of the run's final translations of
valid and test2016 (the hypothesis files beside metrics.json). With ``--final`` (runs that
chose their final weights and decoding on valid, ``trainer.final``), also the valid BLEU of
best.pt decoded as configured, the same for every run, and what was chosen. A run without
scores of valid or test2016 shows ``-`` there.

Every run's metrics.json is read and checked before the table is printed: a missing or
wrongly typed value is one ``error:`` line naming the file and the key (exit status 1);
a bad command line exits with status 2.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from transformer.run_files import (  # noqa: E402
    RunError,
    check,
    check_part,
    read_metrics,
    reader_left,
    shown,
)

ROW_KEYS = {"steps": "integer", "train_seconds": "number", "train_tokens_per_s": "number",
            "best_valid_bleu": "number"}  # fmt: skip
TEST_KEYS = {"bleu": "number", "chrf": "number", "bleu_signature": "text"}
FINAL_KEYS = {"checkpoint": "text or null", "length_penalty": "number"}


def checked(run: Path, final: bool) -> dict:
    """``run``'s metrics.json, holding every value the table shows, each of its kind."""
    m, path = read_metrics(run), run / "metrics.json"
    check(m, path, ROW_KEYS)
    check_part(m, path, "valid", {"bleu": "number"})
    check_part(m, path, "test2016", TEST_KEYS)
    if final:
        choice = check_part(m, path, "final", {}, {"candidates": "list"})
        if choice.get("candidates"):
            check(choice, path, FINAL_KEYS, {"beam_size": "integer"}, prefix="final.")
            first = choice["candidates"][0]
            if not isinstance(first, dict):
                raise RunError(f"{path}: final.candidates[0] must be an object, got {shown(first)}")
            check(first, path, {"valid_bleu": "number"}, prefix="final.candidates[0].")
            if "beam_size" not in choice:  # runs from before trainer.final.beam_sizes
                check(m, path, {"decode": "object"})
                check(m["decode"], path, {"beam_size": "integer"}, prefix="decode.")
    return m


def chosen(m: dict) -> tuple[str, str]:
    """(valid BLEU of best.pt as configured, 'avg_last5, beam 5, lp 1.4') of a run's choice."""
    final = m.get("final", {})
    rows = final.get("candidates")
    if not rows:
        return "-", "-"
    name = Path(final["checkpoint"]).stem if final["checkpoint"] else "last"
    # Runs from before trainer.final.beam_sizes record the beam size only under "decode".
    beam = final["beam_size"] if "beam_size" in final else m["decode"]["beam_size"]
    return f"{rows[0]['valid_bleu']:.2f}", f"{name}, beam {beam}, lp {final['length_penalty']}"


def score(scores: dict, key: str) -> str:
    return f"{scores[key]:.2f}" if key in scores else "-"


def row(run: Path, m: dict, final: bool) -> str:
    valid, test = m.get("valid", {}), m.get("test2016", {})
    cells = [
        f"[{run.name}]({run.name}/)",
        f"{m['steps']:,}",
        f"{m['train_seconds']:.0f}",
        f"{m['train_tokens_per_s']:,}",
        f"{m['best_valid_bleu']:.2f}",
    ]
    if final:
        cells += chosen(m)
    cells += [score(valid, "bleu"), score(test, "bleu"), score(test, "chrf")]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", type=Path, help="run folders, each with a metrics.json")
    ap.add_argument("--final", action="store_true", help="add the choice made on valid")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.json").is_file()]
    try:
        if missing:
            raise RunError(f"no metrics.json in: {', '.join(missing)}")
        metrics = [checked(run, args.final) for run in args.runs]
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = "| run | updates | train s | train tgt tok/s | best valid BLEU (greedy) |"
    rule = "|---|---:|---:|---:|---:|"
    if args.final:
        header += " valid BLEU, best.pt as configured | chosen on valid |"
        rule += "---:|---|"
    print(header + " valid BLEU | test2016 BLEU | test2016 chrF |")
    print(rule + "---:|---:|---:|")
    for run, m in zip(args.runs, metrics):
        print(row(run, m, args.final))
    sigs = {m["test2016"]["bleu_signature"] for m in metrics if "test2016" in m}
    if sigs:
        print(f"\nBLEU signature: `{'`, `'.join(sorted(sigs))}`")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # | head: the reader has what it wanted
        reader_left()
        sys.exit(0)
