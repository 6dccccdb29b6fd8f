"""Side-by-side comparison of finished training runs.

    python -m transformer.compare RUN_A RUN_B ... [--out DIR]

Reads each run directory's ``metrics.json``, ``valid_log.csv`` and ``config.yaml`` (runs of
different corpora or directions are refused: their scores are on other test sets); prints a
Markdown table (BLEU and chrF per test split, parameters, training time, training tokens/s,
decoding sentences/s, best validation step) and writes it to ``OUT/compare.md`` together with
``OUT/valid_bleu.png``: validation BLEU against training time for every run. OUT defaults to
``outputs/compare`` (git ignores ``outputs/``, so a bare run never overwrites committed results).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .run_files import (
    RunError,
    check,
    read_metrics,
    read_valid_curve,
    reader_left,
    shown,
    write_whole,
)

# what the table reads of every run's metrics.json, and of each split's scores in it
TABLE_KEYS = {"model": "text", "parameters": "integer", "train_seconds": "number",
              "train_tokens_per_s": "number", "best_step": "integer",
              "best_valid_bleu": "number"}  # fmt: skip
SPLIT_KEYS = {"bleu": "number", "chrf": "number"}
SPLIT_OPTIONAL = {"bleu_signature": "text", "chrf_signature": "text",
                  "decode_sentences_per_s": "number"}  # fmt: skip


def load_run(path: Path) -> dict:
    """Metrics and validation curve of one run directory; RunError names what is missing
    or of the wrong kind (``run_files.py``)."""
    if not path.is_dir():
        raise RunError(f"{path}: not a directory")
    for name in ("metrics.json", "valid_log.csv"):
        if not (path / name).is_file():
            raise RunError(f"{path}: no {name} (is the run finished?)")
    metrics = read_metrics(path)
    check(metrics, path / "metrics.json", TABLE_KEYS, {"device": "text"})
    for key, value in metrics.items():  # a split's scores: an object with BLEU or chrF
        if isinstance(value, dict) and ("bleu" in value or "chrf" in value):
            check(value, path / "metrics.json", SPLIT_KEYS, SPLIT_OPTIONAL, prefix=f"{key}.")
    curve = read_valid_curve(path)
    return {"path": path, "metrics": metrics, "curve": curve, "corpus": corpus_of(path)}


def corpus_of(path: Path) -> str | None:
    """What the run in ``path`` translated, from its config.yaml ("multi30k de-en"); None
    when the run kept no readable config.yaml."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.load(path / "config.yaml").get("data") or {}
        return f"{data['name']} {data['src_lang']}-{data['tgt_lang']}"
    except Exception:  # no file, not YAML, keys missing: nothing to check against
        return None


def check_same_corpus(runs: list[dict]) -> None:
    """RunError when the runs translated different corpora or directions (de-en against
    fr-en sat in one table, under one "test2016 BLEU" column, without a word)."""
    known = {r["corpus"] for r in runs if r["corpus"]}
    if len(known) > 1:
        each = ", ".join(f"{r['path']} ({r['corpus']})" for r in runs if r["corpus"])
        raise RunError(
            f"the runs translate different corpora or directions, so their scores are on "
            f"different test sets: {each}; compare runs of one"
        )


def run_labels(paths: list[Path]) -> list[str]:
    """Each run folder's name, with the folders above it where names collide (two
    directions' ``transformer`` folders were two rows and legend entries of one name)."""
    paths = [p.resolve() for p in paths]
    labels = [p.name for p in paths]
    for depth in range(2, max(len(p.parts) for p in paths) + 1):
        if len(set(labels)) == len(labels):
            break
        labels = ["/".join(p.parts[-depth:]) for p in paths]
    return labels


def scored_splits(runs: list[dict]) -> list[str]:
    """The splits some run has scores of (an object with BLEU); RunError for a run whose
    value under such a name is no object (a hand-edited ``"test2016": 41``), which the
    table would otherwise show as no scores, or fail on."""
    splits = {}
    for r in runs:
        for key, value in r["metrics"].items():
            if isinstance(value, dict) and "bleu" in value:
                splits.setdefault(key, r["path"] / "metrics.json")
    for r in runs:
        for key, where in splits.items():
            if key in r["metrics"] and not isinstance(r["metrics"][key], dict):
                raise RunError(
                    f"{r['path'] / 'metrics.json'}: {key} must be an object of scores, as in "
                    f"{where}, got {shown(r['metrics'][key])}"
                )
    return sorted(splits)


def table(runs: list[dict]) -> str:
    splits = scored_splits(runs)
    header = ["run", "model", "params (M)"]
    header += [f"{s} {m}" for s in splits for m in ("BLEU", "chrF")]
    header += [
        "train time (s)",
        "train tok/s",
        "decode sent/s (test)",
        "best valid step",
        "best valid BLEU",
        "device",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m = r["metrics"]
        test = next((m[s] for s in splits if s.startswith("test") and s in m), {})
        row = [r["label"], m["model"].rsplit(".", 1)[-1], f"{m['parameters'] / 1e6:.1f}"]
        for s in splits:
            row += [f"{m[s]['bleu']:.2f}", f"{m[s]['chrf']:.2f}"] if s in m else ["-", "-"]
        row += [
            f"{m['train_seconds']:.0f}",
            str(m["train_tokens_per_s"]),
            str(test.get("decode_sentences_per_s", "-")),
            str(m["best_step"]),
            f"{m['best_valid_bleu']:.2f}",
            m.get("device", "?"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    bleu_sig, chrf_sig = (
        next((m[s][key] for r in runs for s in splits if key in (m := r["metrics"]).get(s, {})), "")
        for key in ("bleu_signature", "chrf_signature")
    )
    return "\n".join(lines) + f"\n\nBLEU signature: `{bleu_sig}`; chrF signature: `{chrf_sig}`\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=r["label"])
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories")
    ap.add_argument("--out", type=Path, default=Path("outputs/compare"))
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        scored_splits(runs)
        check_same_corpus(runs)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for run in runs:  # a run that never validated: its table row stands, its curve cannot
        if not run["curve"]:
            print(
                f"warning: {run['path'] / 'valid_log.csv'}: no validation BLEU logged, "
                "so no curve in the plot",
                file=sys.stderr,
            )
    for run, label in zip(runs, run_labels(args.runs)):
        run["label"] = label
    md = table(runs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        picture = args.out / ".valid_bleu.png.tmp.png"
        plot(runs, picture)
        os.replace(picture, args.out / "valid_bleu.png")
        write_whole(  # both written whole, the page last
            args.out / "compare.md",
            "# Run comparison\n\nRuns: "
            + ", ".join(f"`{p}`" for p in args.runs)
            + "\n\n"
            + md
            + "\n![validation BLEU against training time](valid_bleu.png)\n",
        )
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        print(md, flush=True)
    except BrokenPipeError:  # | head: the reader left; the files are written
        reader_left()
    return 0


if __name__ == "__main__":
    sys.exit(main())
