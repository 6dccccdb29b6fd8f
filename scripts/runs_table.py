"""Markdown table of finished runs from their metrics.json (and command.txt), one row each.

    python scripts/runs_table.py results/attention/kinds/*/
    python scripts/runs_table.py --averaged results/gpu/h100-recipe/*/

Columns: updates, training seconds and target tokens/s (as the run measured them), best
validation BLEU during training (greedy), and the final BLEU/chrF of the run's decoding
setting on valid and test2016 from the hypothesis files beside metrics.json. With
``--averaged`` (runs scored by ``scripts/gpu_job.sh`` with AVERAGE=N), also beam-5 BLEU of
best.pt and of the average of the last N checkpoints on valid and test2016, from the run's
``evaluate-{valid,test2016}/results.json``.
"""

import json
import sys
from pathlib import Path


def scored(run: Path, split: str) -> dict:
    """{checkpoint label: BLEU} of the beam-5 rows of ``run/evaluate-SPLIT/results.json``."""
    path = run / f"evaluate-{split}" / "results.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())
    return {
        r["name"].removeprefix(f"{run.name}-"): r["bleu"] for r in rows if r["decode"] == "beam"
    }


def row(run: Path, averaged: bool) -> str:
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
    if averaged:
        v, t = scored(run, "valid"), scored(run, "test2016")
        avg = next((k for k in v if k.startswith("avg_last")), None)
        cells += [f"{d[k]:.2f}" if k in d else "-" for d in (v, t) for k in ("best", avg)]
    return "| " + " | ".join(cells) + " |"


def main(args: list[str]) -> None:
    averaged = "--averaged" in args
    runs = [Path(d) for d in args if d != "--averaged" and (Path(d) / "metrics.json").is_file()]
    header = (
        "| run | updates | train s | train tgt tok/s | best valid BLEU (greedy) "
        "| valid BLEU | test2016 BLEU | test2016 chrF |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if averaged:
        header += " valid, best | valid, averaged | test2016, best | test2016, averaged |"
        rule += "---:|---:|---:|---:|"
    print(header)
    print(rule)
    for run in runs:
        print(row(run, averaged))
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    sigs = {m["test2016"]["bleu_signature"] for m in metrics}
    print(f"\nBLEU signature: `{'`, `'.join(sorted(sigs))}`")


if __name__ == "__main__":
    main(sys.argv[1:])
