"""Which SDPA kernel setting made our model fastest in a ``bench/train_speed.py --sdpa`` table.

    python bench/fastest_sdpa.py TABLE.md CONFIG MAX_TOKENS

Prints the setting (e.g. ``efficient`` or ``flash+efficient``), or nothing when torch's own
pick (the plain ``ours`` row) was fastest, so that ``--sdpa "$(...)"`` passes it on as it is.
``scripts/gpu_bench.sh next`` uses it to compile each config with the kernels that won the
eager sweep it ran just before, within the same device call. Exits 1 if there is no table, or
no row of ours in it for that config and batch size (the sweep did not get that far).
"""

from __future__ import annotations

import sys
from pathlib import Path


def fastest_sdpa(table: str, config: str, max_tokens: int) -> str | None:
    """The ``/sdpa=`` setting of the fastest eager row of ours for ``config`` at
    ``max_tokens`` ('' for torch's pick), or None if there is no such row."""
    best = None  # (tokens/s, setting)
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] != config or cells[1] != str(max_tokens):
            continue
        model = cells[2]
        if model == "ours":
            setting = ""
        elif model.startswith("ours/sdpa="):
            setting = model.removeprefix("ours/sdpa=")
        else:  # Marian, compiled rows, ablations
            continue
        tok_s = float(cells[3].replace(",", ""))
        if best is None or tok_s > best[0]:
            best = (tok_s, setting)
    return None if best is None else best[1]


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    path, config, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if not Path(path).is_file():
        sys.exit(f"{path}: no such table (the sweep did not run, or stopped before a row)")
    setting = fastest_sdpa(Path(path).read_text(), config, max_tokens)
    if setting is None:
        sys.exit(f"{path}: no eager row of ours for {config} at {max_tokens} tokens")
    print(setting)


if __name__ == "__main__":
    main()
