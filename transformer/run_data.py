"""A run's tokenizers and encoded splits: trained or reused, copied into the run directory,
and every split encoded once into the Arrow cache (``corpus_cache.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

from .corpus_cache import encode_split, open_split, sample_sentences
from .data import DataError
from .settings import TrainingError
from .tokenizer import Tokenizer, copy_into, file_sha256, train_or_load

log = logging.getLogger(__name__)


def prepare_data(cfg, run_dir: Path, resuming: bool = False):
    """Train or reuse the tokenizer(s) (on a bounded sample of the training split), copy them
    into the run dir (a run that resumes, ``resuming``, keeps the ones it has there), and
    encode every split or map its cached encoding (``transformer/corpus_cache.py``)."""
    d = cfg.data
    cache_dir = Path(d.cache_dir)
    sources = {
        split: open_split(d, split, cache_dir)
        for split in [d.train_split, d.valid_split, *d.test_splits]
    }
    names = {"src": f"tokenizer/{d.src_lang}.model", "tgt": f"tokenizer/{d.tgt_lang}.model"}
    if d.joint_vocab:
        names = {"src": "tokenizer/joint.model", "tgt": "tokenizer/joint.model"}
    paths = {side: run_dir / name for side, name in names.items()}
    if resuming and all(p.is_file() for p in paths.values()):
        # The checkpoints' token ids mean this run's pieces, whatever the corpus or the cache
        # would give now (a corpus copied afresh, a cleared cache, a newer SentencePiece).
        src_tok = Tokenizer(paths["src"])
        tgt_tok = src_tok if d.joint_vocab else Tokenizer(paths["tgt"])
        log.info("resuming: the run's own tokenizer (%s)", ", ".join(sorted(set(names.values()))))
    else:
        src_tok, tgt_tok = train_tokenizers(cfg, sources, names, run_dir)
    tok_info = {}
    for side, p in paths.items():
        tok_info[side] = str(p.relative_to(run_dir))
        tok_info[f"{side}_sha256"] = file_sha256(p)
    splits = {
        name: encode_split(
            f"{fp}|{d.src_lang}-{d.tgt_lang}",
            load,
            src_tok,
            tgt_tok,
            d.max_len,
            name == d.train_split,
            f"{d.name}/{name}",
            cache_dir,
            d.num_proc,
            d.mapped_budget_mb,
        )
        for name, (fp, load) in sources.items()
    }
    return splits, src_tok, tgt_tok, tok_info


def train_tokenizers(cfg, sources: dict, names: dict, run_dir: Path):
    """The (source, target) tokenizers of ``cfg.data``, trained on a bounded sample of the
    training split or found in the cache (``tokenizer.train_or_load``), and copied into
    ``run_dir`` under ``names`` (side -> path in the run dir). ``sources``: split ->
    (fingerprint, load) of every split, whose evaluation splits are read first, so that a
    bad file fails before the training split is read and encoded."""
    d = cfg.data
    train_fp, train_load = sources[d.train_split]
    spm_args = dict(
        cache_dir=Path(d.cache_dir) / "spm",
        vocab_size=d.vocab_size,
        model_type=d.spm_model_type,
        character_coverage=d.character_coverage,
        input_sentence_size=d.spm_input_sentence_size,
        seed=cfg.seed,
    )

    def sample(*columns):  # called only when a tokenizer has to be trained
        def texts():
            for split, (_, load) in sources.items():  # small: a bad evaluation file fails
                if split != d.train_split:  # before the training split is read and encoded
                    load()
            got = sample_sentences(train_load(), list(columns), d.spm_input_sentence_size, cfg.seed)
            if not any(t.strip() for t in got):  # SentencePiece's own words: [!sentences_.empty()]
                langs = " and ".join(d[f"{c}_lang"] for c in columns)
                raise DataError(
                    f"{d.name}/{d.train_split} ({langs}): no text to train the tokenizer on, "
                    f"all {len(got)} sampled lines are blank"
                )
            return got

        return texts

    try:
        if d.joint_vocab:
            src_tok = tgt_tok = train_or_load(
                sample("src", "tgt"), key=f"{train_fp}|src+tgt", **spm_args
            )
        else:
            src_tok = train_or_load(sample("src"), key=f"{train_fp}|src", **spm_args)
            tgt_tok = train_or_load(sample("tgt"), key=f"{train_fp}|tgt", **spm_args)
    except DataError:  # the corpus (line counts, gzip, blank text): not the size's fault
        raise
    except ValueError as e:  # e.g. fewer pieces asked for than the corpus has characters
        raise TrainingError(f"data.vocab_size={d.vocab_size}: {e}") from e
    for name, tok in {names["src"]: src_tok, names["tgt"]: tgt_tok}.items():
        copy_into(tok, run_dir, name)  # once for a joint model
        if len(tok) < d.vocab_size:  # SentencePiece's hard_vocab_limit=false
            log.warning(
                "%s has %d pieces, fewer than data.vocab_size=%d: its training sample "
                "supports no more",
                name,
                len(tok),
                d.vocab_size,
            )
    return src_tok, tgt_tok
