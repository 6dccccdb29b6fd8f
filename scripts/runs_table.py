"""Markdown table of finished runs from their metrics.json, one row each.

    python scripts/runs_table.py results/attention/kinds/*/
    python scripts/runs_table.py --final results/gpu/h100-recipe/*/

Columns: updates, training seconds and target tokens/s (as the run measured them), best
validation BLEU during training (greedy), and BLEU/chrF of the run's final translations of
valid and test2016 (the hypothesis files beside metrics.json). With ``--final`` (runs that
chose their final weights and decoding on valid, ``trainer.final``), also the valid BLEU of
best.pt decoded as configured, the same for every run, and what was chosen.
"""

import json
import sys
from pathlib import Path


def chosen(m: dict) -> tuple[str, str]:
    """(valid BLEU of best.pt as configured, 'avg_last5, beam 5, lp 1.4') of a run's choice."""
    final = m.get("final", {})
    rows = final.get("candidates")
    if not rows:
        return "-", "-"
    name = Path(final["checkpoint"]).stem if final["checkpoint"] else "last"
    # Runs from before trainer.final.beam_sizes record the beam size only under "decode".
    beam = final.get("beam_size", m["decode"]["beam_size"])
    return f"{rows[0]['valid_bleu']:.2f}", f"{name}, beam {beam}, lp {final['length_penalty']}"


def row(run: Path, final: bool) -> str:
    m = json.loads((run / "metrics.json").read_text())
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
    cells += [
        f"{valid.get('bleu', float('nan')):.2f}",
        f"{test.get('bleu', float('nan')):.2f}",
        f"{test.get('chrf', float('nan')):.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(args: list[str]) -> None:
    final = "--final" in args
    runs = [Path(d) for d in args if d != "--final"]
    missing = [str(r) for r in runs if not (r / "metrics.json").is_file()]
    if not runs:
        sys.exit("usage: runs_table.py [--final] RUN_DIR...")
    if missing:
        sys.exit(f"runs_table.py: no metrics.json in: {', '.join(missing)}")
    header = "| run | updates | train s | train tgt tok/s | best valid BLEU (greedy) |"
    rule = "|---|---:|---:|---:|---:|"
    if final:
        header += " valid BLEU, best.pt as configured | chosen on valid |"
        rule += "---:|---|"
    print(header + " valid BLEU | test2016 BLEU | test2016 chrF |")
    print(rule + "---:|---:|---:|")
    for run in runs:
        print(row(run, final))
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    sigs = {m["test2016"]["bleu_signature"] for m in metrics}
    print(f"\nBLEU signature: `{'`, `'.join(sorted(sigs))}`")


if __name__ == "__main__":
    main(sys.argv[1:])
