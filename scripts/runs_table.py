"""Markdown table of finished runs from their metrics.json (and command.txt), one row each.

    python scripts/runs_table.py results/attention/kinds/*/

Columns: updates, training seconds and target tokens/s (as the run measured them), best
validation BLEU during training (greedy), and the final BLEU/chrF of the run's decoding
setting on valid and test2016 from the hypothesis files beside metrics.json.
"""

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    valid, test = m.get("valid", {}), m.get("test2016", {})
    cells = [
        f"[{run.name}]({run.name}/)",
        f"{m['steps']:,}",
        f"{m['train_seconds']:.0f}",
        f"{m['train_tokens_per_s']:,}",
        f"{m['best_valid_bleu']:.2f}",
        f"{valid.get('bleu', float('nan')):.2f}",
        f"{test.get('bleu', float('nan')):.2f}",
        f"{test.get('chrf', float('nan')):.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(dirs: list[str]) -> None:
    runs = [Path(d) for d in dirs if (Path(d) / "metrics.json").is_file()]
    print(
        "| run | updates | train s | train tgt tok/s | best valid BLEU (greedy) "
        "| valid BLEU | test2016 BLEU | test2016 chrF |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(row(run))
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    sigs = {m["test2016"]["bleu_signature"] for m in metrics}
    print(f"\nBLEU signature: `{'`, `'.join(sorted(sigs))}`")


if __name__ == "__main__":
    main(sys.argv[1:])
