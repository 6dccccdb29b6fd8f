"""Score checkpoints on one split under several decoding settings, keeping every hypothesis.

    python -m transformer.evaluate CKPT [CKPT ...] [--names A B] [--split test2016]
        [--decode greedy beam beam:length_penalty=1.0 ...] [--data-dir DIR] [--out DIR]

A decoding setting is ``NAME[:KEY=VALUE,...]``: conf/decode/NAME.yaml with those ``decode.*``
overrides, composed by Hydra exactly as ``translate.py decode=NAME decode.KEY=VALUE`` would.
For each checkpoint and setting, the best translation of every line of ``--split`` goes to
``OUT/NAME/SPLIT.SETTING.hyp``; ``OUT/results.json`` and ``OUT/README.md`` hold cased BLEU,
chrF and lowercased BLEU with their sacreBLEU signatures, decoding time and the command.
OUT defaults to ``outputs/evaluate`` (ignored by git; pass ``--out results/...`` to keep them).
Use it on ``valid`` to pick a beam size or length penalty, then report ``test2016`` once.

Whatever would fail after some decoding fails before any: every setting is composed and every
checkpoint is read whole, its model and tokenizers built on the CPU and its split found. An
earlier evaluation's results.json and README.md in OUT are removed before decoding starts (its
hypothesis files are left: OUT may hold other files, and they are then listed nowhere; an OUT
whose README.md or results.json this tool did not write is refused), and both are rewritten
after each setting, so after a failure midway they list exactly the hypotheses written.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import checkpoint
from .cli import EXPECTED, one_line
from .metrics import Scorer
from .run_files import write_whole
from .settings import cpu_model, pick_device
from .translator import decode_options, encode_sources, from_checkpoint, translate_ids

CONF = Path(__file__).resolve().parent.parent / "conf"


def decode_setting(spec: str):
    """``NAME[:KEY=VALUE,...]`` -> (file-name tag, decode config)."""
    from hydra import compose, initialize_config_dir

    name, _, rest = spec.partition(":")
    pairs = [p for p in rest.split(",") if p]
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--decode {spec}: {p!r} is not KEY=VALUE")
    if not (CONF / "decode" / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in (CONF / "decode").glob("*.yaml"))
        raise ValueError(f"--decode {spec}: no conf/decode/{name}.yaml (options: {options})")
    overrides = ["ckpt=none", f"decode={name}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        keys = list(compose("translate", overrides=overrides).decode)
        unknown = [k for k in (p.split("=", 1)[0] for p in pairs) if k not in keys]
        if unknown:
            raise ValueError(f"--decode {spec}: no key {unknown[0]!r} (keys: {', '.join(keys)})")
        try:  # Hydra's parser names neither the option nor the spec ("no viable alternative")
            cfg = compose("translate", overrides=overrides + [f"decode.{p}" for p in pairs])
            decode_options(cfg.decode)  # a bad value (beam_size=0) fails here, before decoding
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise ValueError(f"--decode {spec}: {one_line(e)}") from e
    tag = ".".join([name, *pairs])
    return tag, cfg.decode


def corpus(cfg: dict, data_dir) -> DictConfig:
    """The data config of ``cfg`` (a checkpoint's), with ``--data-dir`` for its folder."""
    data_cfg = OmegaConf.create(cfg["data"])
    if data_dir:
        data_cfg.data_dir = str(data_dir)
    return data_cfg


def check_checkpoint(ckpt: Path, split: str, data_dir) -> None:
    """Fail now what would fail only once the checkpoints before ``ckpt`` were decoded: it is
    a whole checkpoint whose model and tokenizers build (on the CPU, then dropped), and its
    corpus has ``split``."""
    if ckpt.is_dir():
        best = [b for b in (ckpt / "checkpoints" / "best.pt", ckpt / "best.pt") if b.is_file()]
        hint = f" (did you mean {best[0]}?)" if best else ""
        raise ValueError(f"{ckpt} is a folder, not a checkpoint file{hint}")
    saved = checkpoint.load(ckpt)
    from_checkpoint(saved, ckpt, torch.device("cpu"))
    data_cfg = corpus(saved["config"], data_dir)
    if data_dir and not (Path(data_dir) / data_cfg.name).is_dir():
        raise ValueError(
            f"--data-dir {data_dir} has no {data_cfg.name}/ folder, the corpus of {ckpt}"
        )
    from .data import load_split  # datasets is imported only here

    load_split(data_cfg, split)


def evaluate(ckpt, name, split, settings, out: Path, device, data_dir=None) -> Iterator[dict]:
    """Decode ``split`` with each (tag, decode config) of ``settings`` (``decode_setting``);
    write hypotheses; yield a row of scores after each."""
    saved = checkpoint.load(ckpt)
    model, src_tok, tgt_tok, cfg = from_checkpoint(saved, Path(ckpt), device)
    step = saved.get("progress", {}).get("step")
    del saved
    data_cfg = corpus(cfg, data_dir)
    from .data import load_split  # datasets is imported only here

    ds = load_split(data_cfg, split)
    # A null in a Hub dataset is an empty line, as training reads it (it crashed here)
    sources, refs = (["" if t is None else t for t in ds[side]] for side in ("src", "tgt"))
    scorer = Scorer(refs)
    ids = encode_sources(sources, src_tok, data_cfg.max_len)
    for tag, decode_cfg in settings:
        start = time.perf_counter()
        nbest = translate_ids(model, ids, tgt_tok, decode_cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        hyps = tgt_tok.decode([hyps[0][0] if hyps else [] for hyps in nbest])
        hyp_path = out / name / f"{split}.{tag}.hyp"
        hyp_path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(hyp_path, "".join(h + "\n" for h in hyps))
        yield {
            "name": name,
            "checkpoint": str(ckpt),
            "step": step,
            "data": data_cfg.name,
            "src_lang": data_cfg.src_lang,
            "tgt_lang": data_cfg.tgt_lang,
            "split": split,
            "decode": tag,
            "decode_config": OmegaConf.to_container(decode_cfg, resolve=True),
            "hypotheses": str(hyp_path.relative_to(out)),  # beside results.json
            "seconds": round(seconds, 2),
            "sentences_per_s": round(len(hyps) / seconds, 1),
            **scorer.score_all(hyps),
        }


def write_results(out: Path, rows: list[dict], command: str, device) -> None:
    """``out``/results.json and README.md for ``rows``, each replaced atomically."""
    write_whole(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_whole(out / "README.md", markdown(rows, command, device))


README_TITLE = "# Decoding settings on "


def earlier_results(out: Path) -> list[Path]:
    """The results.json and README.md of an earlier evaluation into ``out``, to remove
    before new hypotheses are written (never listed beside them); a ValueError if either
    is not this tool's: --out named a folder holding other files by those names (a
    project's own README.md was deleted without a word)."""
    found = [out / n for n in ("results.json", "README.md") if (out / n).is_file()]
    for path in found:
        text = path.read_text(encoding="utf-8", errors="replace")
        ours = text.startswith(README_TITLE) if path.suffix == ".md" else is_results(text)
        if not ours:
            raise ValueError(
                f"--out {out}: its {path.name} is not one this tool wrote; evaluate into "
                "another folder (it replaces results.json and README.md there)"
            )
    return found


def is_results(text: str) -> bool:
    try:
        rows = json.loads(text)
    except ValueError:
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and "hypotheses" in r for r in rows)


def markdown(rows: list[dict], command: str, device) -> str:
    lines = [
        f"{README_TITLE}{rows[0]['split']}",
        "",
        f"Command: `{command}`  ",
        f"Device: {device_name(device)}; torch {torch.__version__}; fp32.",
        "",
        "| model | step | decode | BLEU | chrF | BLEU (lc) | sentences/s | hypotheses |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['step']} | {r['decode']} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
            f"{r['bleu_lc']:.2f} | {r['sentences_per_s']} | [{Path(r['hypotheses']).name}]"
            f"({r['name']}/{Path(r['hypotheses']).name}) |"
        )
    r = rows[0]
    lines += [
        "",
        f"BLEU: `{r['bleu_signature']}`  ",
        f"chrF: `{r['chrf_signature']}`  ",
        f"BLEU (lc): `{r['bleu_lc_signature']}`",
        "",
    ]
    return "\n".join(lines)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({cpu_model()}, {threads} thread{'s' if threads > 1 else ''})"


def default_names(ckpts: list[Path]) -> list[str]:
    """The run folder of each checkpoint (the folder above ``checkpoints/``), plus the file
    name when a run appears twice, and the folders above it while labels still collide (two
    sweeps' ``transformer_0``)."""
    paths = [c.resolve() for c in ckpts]
    runs = [p.parent.parent for p in paths]
    names: list[str] = []
    for depth in range(1, max(len(r.parts) for r in runs) + 1):
        names = ["-".join(r.parts[-depth:]) for r in runs]
        names = [n if names.count(n) == 1 else f"{n}-{p.stem}" for n, p in zip(names, paths)]
        if len(set(names)) == len(names):
            break
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpts", nargs="+", type=Path)
    p.add_argument("--names", nargs="+", help="one label per checkpoint (default: its run)")
    p.add_argument("--split", default="test2016")
    p.add_argument("--decode", nargs="+", default=["greedy", "beam"])
    p.add_argument("--data-dir", help="folder holding the corpus (default: the training one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("outputs/evaluate"))
    args = p.parse_args(argv)
    names = args.names or default_names(args.ckpts)
    if len(names) != len(args.ckpts) or len(set(names)) != len(names):
        p.error("--names needs one distinct label per checkpoint" if args.names else
                "the checkpoints are one file named twice: give it once")  # fmt: skip
    command = shlex.join(["python", "-m", "transformer.evaluate", *(argv or sys.argv[1:])])
    rows = []
    try:
        device = pick_device(args.device)
        # what would fail after some decoding (a later --decode or checkpoint, an unwritable
        # --out, a missing corpus) fails first
        settings = [decode_setting(spec) for spec in args.decode]
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise ValueError(f"--data-dir {args.data_dir}: no such folder")
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} names a file, not a folder")
        for ckpt in args.ckpts:
            check_checkpoint(ckpt, args.split, args.data_dir)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out}: {e.strerror or e}") from e
        for old in earlier_results(args.out):  # never beside new hypotheses
            old.unlink()
        for ckpt, name in zip(args.ckpts, names):
            for row in evaluate(ckpt, name, args.split, settings, args.out, device, args.data_dir):
                rows.append(row)
                write_results(args.out, rows, command, device)  # a later failure keeps these
    except (*EXPECTED, HydraException) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = f"; {args.out} lists the {len(rows)} setting(s) finished" if rows else ""
        print(f"interrupted{done}", file=sys.stderr)
        return 130
    print((args.out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
