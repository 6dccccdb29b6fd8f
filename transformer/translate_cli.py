"""translate(cfg): the body of translate.py.

Input: ``input=FILE`` or stdin (also ``input=-``), one sentence per line (an interactive
prompt when stdin is a terminal). Output: ``output=FILE`` or stdout (also ``output=-``), one
translation per input line, same order (files named ``*.gz`` are read and written gzipped);
with ``decode.nbest=K > 1``, up to K lines per input, tab-separated
``INDEX<TAB>SCORE<TAB>TRANSLATION`` (INDEX = 0-based input line, SCORE = log-probability,
length-normalised for beam search (GNMT penalty) and summed for sampling, best first).
``ref=FILE`` also prints sacreBLEU and chrF with signatures.
``attention_plot=DIR`` draws the attention behind each best translation into
``DIR/{INDEX:04d}/`` (transformer/visualize.py): cross-attention (the RNN's alignment), and
the Transformer's encoder and decoder self-attention.

``ckpt`` is a checkpoint file, or a finished run's folder: then the weights, beam size and
length penalty the run chose on its validation set (``final`` in its metrics.json, see
``FinalChoice.choose``), which also translated its test set; ``decode=NAME``,
``decode.beam_size`` or ``decode.length_penalty`` given on the command line still win.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .checkpoint import CheckpointError
from .data import BAD_GZIP, DataError, bad_gzip, decode_lines, open_binary
from .metrics import score_all
from .search import length_limits
from .settings import pick_device
from .translator import (
    decode_options,
    encode_sources,
    load_for_inference,
    some_numbers,
    translate_ids,
)
from .values import as_path_text

log = logging.getLogger(__name__)


# what the command line names as paths (input=2024 reaches the code as a number), and what
# to give instead of an empty value (``input=$SRC`` with SRC unset)
PATH_KEYS = {
    "ckpt": "name a run folder or a checkpoint file",
    "input": "name a file, or - for stdin, or leave input out",
    "output": "name a file, or - for stdout, or leave output out",
    "ref": "name the reference file, or leave ref out",
    "attention_plot": "name a folder, or leave attention_plot out",
}


def read_input(path: str | None, key: str = "input") -> list[str]:
    """Lines of ``path`` (gunzipped if it ends in .gz, as the training corpora are read) or
    of stdin, undecodable bytes replaced with a warning; ``key`` names the setting in the
    error when the file cannot be read."""
    try:
        if path:
            with open_binary(Path(path)) as f:
                raw = f.read()
        else:
            raw = sys.stdin.buffer.read()
    except BAD_GZIP as e:  # before OSError: gzip.BadGzipFile is one
        raise bad_gzip(f"{key}={path}", None, e) from e
    except OSError as e:
        raise DataError(f"{key}={path}: {e.strerror or e}") from e
    return decode_lines(raw, path or "stdin") if raw else []


def write_output(path: str, text: str) -> None:
    """``text`` into ``path`` (gzipped if it ends in .gz); a failed write (disk full, no
    permission) names ``output=``. A regular file (or a new one) is written beside itself
    and then renamed over, so a failed write leaves an earlier file whole; a link's target
    is what is replaced, and a device or pipe (``/dev/stdout``) is written directly."""
    data = text.encode("utf-8")
    data = gzip.compress(data, mtime=0) if path.endswith(".gz") else data
    target = Path(path).resolve()
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        if target.exists() and not target.is_file():
            with open(path, "wb") as f:
                f.write(data)
            return
        with open(tmp, "wb") as f:
            f.write(data)
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise DataError(f"output={path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path: str) -> None:
    """What would make writing ``output=`` fail after the translating, and lose it."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"output={path} is a folder, not a file")
    folder = out.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise PermissionError(f"output={path}: cannot write into {folder}")
    if out.exists() and not os.access(out, os.W_OK):
        raise PermissionError(f"output={path}: the file exists and is not writable")


def check_not_read(path: str, read: dict[str, str | Path | None]) -> None:
    """``output=`` is none of the files translating reads (``read``: what each is called, the
    file or None): writing it would destroy a checkpoint or tokenizer, or replace a reference
    with the hypotheses. Another name of the same file (a hard or symbolic link) counts."""
    out = Path(path)
    if not out.exists():
        return
    for what, other in read.items():
        if other is not None and Path(other).exists() and os.path.samefile(out, other):
            raise ValueError(f"output={path} is the {what}: it would be overwritten")


def check_not_pictures(output: str, plots: str) -> None:
    """``output=`` is neither the ``attention_plot=`` folder nor one of its sentence folders,
    which are made while translating: the translations would then fail to be written."""
    out, folder = Path(output).resolve(), Path(plots).resolve()
    if out == folder or (out.is_relative_to(folder) and out.relative_to(folder).parts[0].isdigit()):
        raise ValueError(
            f"output={output} is where attention_plot={plots} puts its pictures: name another file"
        )


def make_plot_folder(path: str) -> None:
    """Create the ``attention_plot=`` folder; one that holds the pictures of an earlier
    translation is refused: where this one has fewer lines, or a blank line, the earlier
    pictures would stay beside the new ones, numbered as if they were this input's."""
    folder = Path(path)
    ours = folder.glob("[0-9][0-9][0-9][0-9]*")  # {INDEX:04d}/, as plot_translations names them
    earlier = [p.name for p in ours if p.name.isdigit() and p.is_dir()]
    if earlier:
        raise ValueError(
            f"attention_plot={path} holds the pictures of an earlier translation "
            f"({', '.join(sorted(earlier)[:3])}{', ...' * (len(earlier) > 3)}): they would "
            "mix with these; name a new or empty folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"attention_plot={path}: {e.strerror or e}") from e


def format_output(
    nbest: list[list], tgt_tok, k: int, first: int = 0
) -> tuple[list[str], list[str]]:
    """(best translation per input, output lines: one per input, or TSV n-best lines whose
    INDEX counts the inputs from ``first``: at the prompt, the lines typed before)."""
    best = tgt_tok.decode([hyps[0][0] if hyps else [] for hyps in nbest])
    if k <= 1:
        return best, best
    lines = []
    for i, hyps in enumerate(nbest, start=first):
        if not hyps:
            lines.append(f"{i}\t0.0000\t")
            continue
        texts = tgt_tok.decode([tokens for tokens, _ in hyps])
        lines += [f"{i}\t{score:.4f}\t{t}" for (_, score), t in zip(hyps, texts)]
    return best, lines


def report_cut(model, ids: list[list[int]], nbest: list[list], opts, first_line: int) -> None:
    """Warn about best translations that end at the output length limit (decode.max_len_a *
    source length + decode.max_len_b, or the model's positions), where the search forces EOS:
    they may be cut short. ``first_line``: the 1-based line number of ``ids[0]``."""
    rows = [i for i, hyps in enumerate(nbest) if hyps]
    if not rows:
        return
    lengths = torch.tensor([len(ids[i]) for i in rows])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    limits = length_limits(model, mask, opts.max_len_a, opts.max_len_b).tolist()
    cut = [i for i, limit in zip(rows, limits) if len(nbest[i][0][0]) + 1 >= limit]
    if cut:
        cap = getattr(model, "max_target_len", None)
        limit = f"decode.max_len_a={opts.max_len_a} x source length + decode.max_len_b="
        limit += f"{opts.max_len_b}" + (f", or the model's {cap} positions" if cap else "")
        shown = some_numbers([first_line + i for i in cut])
        log.warning(
            "%d translation(s) stopped at the output length limit (%s) and may be cut short "
            "(line %s)", len(cut), limit, shown,
        )  # fmt: skip


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoints a folder holds, the ones to suggest first: best.pt, last.pt, the
    step files newest first, then any other (an average)."""
    found = [folder / n for n in ("best.pt", "last.pt") if (folder / n).is_file()]
    found += checkpoint.step_checkpoints(folder)
    return found + sorted(p for p in folder.glob("*.pt") if p not in found and p.is_file())


def no_run_choice(folder: Path) -> str:
    """Why ``ckpt=folder``, which has no metrics.json, names no finished run, and what to
    give instead: a file of a checkpoints/ folder itself, or of an unfinished run's."""
    if here := checkpoints_in(folder):  # RUN/checkpoints: it holds the files themselves
        parent = folder.resolve().parent
        run = f" (or the run folder, ckpt={parent})" if (parent / "metrics.json").is_file() else ""
        return f"ckpt={folder} is a folder of checkpoints: name one, e.g. ckpt={here[0]}{run}"
    ckpts = folder / "checkpoints"
    if not ckpts.is_dir():
        return (
            f"ckpt={folder} is a folder with neither metrics.json nor checkpoints/, not a "
            "run folder: name a run folder or a checkpoint file"
        )
    if found := checkpoints_in(ckpts):
        return (
            f"ckpt={folder} is a folder without metrics.json (the run has not finished); "
            f"name a checkpoint file instead, e.g. ckpt={found[0]}"
        )
    return (
        f"ckpt={folder} is a folder without metrics.json (the run has not finished), and "
        f"{ckpts} holds no checkpoint yet"
    )


def run_choice(run: Path, decode, overrides: list[str]) -> Path:
    """The checkpoint a finished run in ``run`` chose on valid; sets in ``decode`` every
    decoding setting its test set was translated with (metrics.json ``decode``: the chosen
    beam size and length penalty, and the run's max_len_a, max_len_b, min_len, ...) that
    ``overrides`` (the command line) did not set. ``decode=NAME`` there keeps that preset
    whole."""
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise CheckpointError(no_run_choice(run))
    try:
        content = json.loads(metrics.read_text())
        final, used = content.get("final"), content.get("decode")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{metrics}: not a metrics file ({e})") from e
    for name, value in (("final", final), ("decode", used)):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{metrics}: its {name!r} is not a mapping, got {value!r}")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    chosen = {k: final[k] for k in ("beam_size", "length_penalty") if k in (final or {})}
    if "decode" not in given:  # decode=greedy|sample is a choice of its own: keep all of it
        for key, value in {**(used or {}), **chosen}.items():
            if key in decode and f"decode.{key}" not in given:
                decode[key] = value
    if not final or not final.get("checkpoint"):  # a run from before the choice existed
        chosen_file, why = run / "checkpoints" / "best.pt", "names no final choice"
        log.info("%s names no final choice: translating with best.pt", metrics)
    else:
        chosen_file, why = run / final["checkpoint"], "chose it on valid (final.checkpoint)"
        log.info(
            "%s: %s, beam %s, length penalty %s (chosen on %s)",
            run,
            final["checkpoint"],
            decode["beam_size"],
            decode["length_penalty"],
            final.get("chosen_on") or "no candidates",
        )
    if not chosen_file.is_file():  # deleted since, e.g. to save disk
        others = checkpoints_in(run / "checkpoints") if (run / "checkpoints").is_dir() else []
        hint = f"; name another, e.g. ckpt={others[0]}" if others else ""
        raise CheckpointError(f"ckpt={run}: {chosen_file} is gone, and {metrics} {why}{hint}")
    return chosen_file


def translate(cfg, overrides: list[str] | None = None) -> list[str]:
    """``overrides``: the command line's (default: Hydra's, when it is running)."""
    for key, instead in PATH_KEYS.items():
        as_path_text(cfg, key, key)
        if cfg[key] is not None and not cfg[key].strip():  # read stdin, wrote stdout, ...
            raise ValueError(f"{key}={cfg[key]} is empty: {instead}")
    for key in ("input", "output"):  # "-": stdin and stdout, as for most tools
        if cfg[key] == "-":
            cfg[key] = None
    device = pick_device(cfg.device)
    ckpt = Path(cfg.ckpt)
    run_metrics = ckpt / "metrics.json" if ckpt.is_dir() else None  # read for the choice
    if ckpt.is_dir():
        if overrides is None:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        ckpt = run_choice(ckpt, cfg.decode, overrides)
    prompt = cfg.input is None and sys.stdin.isatty()
    if prompt and (cfg.ref or cfg.output):  # the prompt prints each translation, scores none
        raise ValueError(
            "ref= and output= need input=FILE or lines piped to stdin, not the interactive prompt"
        )
    lines = refs = None
    if not prompt:  # what would fail after the translating, and lose it, fails first
        lines, refs = read_inputs(cfg, ckpt, run_metrics)
    if cfg.attention_plot:
        make_plot_folder(cfg.attention_plot)
    opts = decode_options(cfg.decode)  # a bad setting fails before the model is loaded
    model, src_tok, tgt_tok, train_cfg = load_for_inference(ckpt, device)
    if cfg.output and not prompt:
        tokenizers = {"source tokenizer": src_tok.path, "target tokenizer": tgt_tok.path}
        check_not_read(cfg.output, tokenizers)
    max_len = train_cfg["data"]["max_len"]

    seen = [0]  # inputs so far: the index of the next picture folder

    def run(lines, bar=None):
        ids = encode_sources(lines, src_tok, max_len)
        if bar is not None:  # what is decoded: lines with subwords (a line of spaces has none)
            bar.reset(total=sum(1 for s in ids if s))
        nbest = translate_ids(model, ids, tgt_tok, cfg.decode, device, bar and bar.update)
        report_cut(model, ids, nbest, opts, first_line=seen[0] + 1)
        if cfg.attention_plot:
            from .visualize import plot_translations  # matplotlib only when asked for

            best = [hyps[0][0] if hyps else None for hyps in nbest]
            plot_translations(model, ids, best, src_tok, tgt_tok, cfg.attention_plot, seen[0])
        first, seen[0] = seen[0], seen[0] + len(lines)
        return format_output(nbest, tgt_tok, cfg.decode.nbest, first)

    if prompt:
        return interactive(run)
    with tqdm(unit="sent", file=sys.stderr, disable=cfg.input is None, dynamic_ncols=True) as bar:
        best, out_lines = run(lines, bar)
    out = "".join(line + "\n" for line in out_lines)
    if cfg.output:
        write_output(cfg.output, out)
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    if refs is not None:
        scores = score_all(best, refs)
        print(
            f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}\n"
            f"{scores['bleu_signature']}\n{scores['chrf_signature']}",
            file=sys.stderr,
        )
    return best


def read_inputs(
    cfg, ckpt: Path, run_metrics: Path | None = None
) -> tuple[list[str], list[str] | None]:
    """The input lines and the references (None without ``ref=``), read and checked against
    each other, and ``output=`` checked to be writable and none of the files read
    (``ckpt``: the checkpoint; ``run_metrics``: the metrics.json of ``ckpt=RUN``, which
    named it), before anything is translated."""
    lines = read_input(cfg.input)
    refs = read_input(cfg.ref, "ref") if cfg.ref else None
    if refs is not None and len(refs) != len(lines):
        raise ValueError(
            f"ref={cfg.ref} has {len(refs)} lines but input={cfg.input or '(stdin)'} has "
            f"{len(lines)}: one reference per input line"
        )
    if refs is not None and not lines:  # sacreBLEU's IndexError on no sentences at all
        raise ValueError(
            f"input={cfg.input or '(stdin)'} and ref={cfg.ref} are empty: nothing to score"
        )
    if cfg.output:
        if cfg.attention_plot:
            check_not_pictures(cfg.output, cfg.attention_plot)
        check_output(cfg.output)
        read = {"input file": cfg.input, "reference file": cfg.ref, "checkpoint": ckpt,
                "run's metrics.json": run_metrics}  # fmt: skip
        check_not_read(cfg.output, read)
    return lines, refs


def interactive(run) -> list[str]:
    """Prompt, translate, repeat until end of input (Ctrl-D)."""
    print("Type a sentence and press Enter; Ctrl-D to quit.", file=sys.stderr)
    done = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return done
        # a byte that is not UTF-8 reaches input() as a lone surrogate (Python's
        # surrogateescape), which the tokenizer refuses: repaired as input= files are
        line = (decode_lines(line.encode("utf-8", "surrogateescape"), "the prompt") or [""])[0]
        best, out_lines = run([line])
        print("\n".join(out_lines))
        done += best
