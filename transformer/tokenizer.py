"""SentencePiece subword tokenizer (Kudo & Richardson 2018): training, caching, loading.

This module is the only owner of the special ids. Models are trained with explicit
pad/unk/bos/eos ids (SentencePiece has no pad by default). Trained models are cached
under ``cache_dir`` keyed by a hash of the settings and of a corpus fingerprint (the trainer
passes one) or, without one, of the training text, so a second run with the same corpus
reuses the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPM_CHECK = re.compile(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ?")  # the location of its failed check
LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # str.splitlines' set
# SentencePiece's trainer leaves out, without a word at our log level, every sentence longer
# than its ``max_sentence_length`` (4,192 bytes by default): in a corpus of paragraphs or
# documents, a language whose lines are all longer never reached the tokenizer, and came out
# as <unk>. ``train_or_load`` raises the limit to the longest sentence it trains on.
SPM_MAX_SENTENCE_BYTES = 4192
# SentencePiece's threads split the sentences of its EM steps, so the pieces it learns depend
# on their number: trained with one per core (os.cpu_count()), Multi30k's tokenizer on a
# 16-core GPU machine and on a 2-core one differed in pieces and scores, and encoded 16,687 of
# its 58,000 training sentences differently. A fixed count makes it the same on any machine
# (16 threads also trained it faster on 2 cores than 2 threads did: 2.7 s against 8-12 s).
SPM_THREADS = 16


def private_name(path: Path, what: str = "tmp") -> Path:
    """A name beside ``path`` that no other process picks: the process id alone is not
    enough where two containers share a cache folder and each runs as PID 1 (one deleted
    or overwrote the other's files mid-write)."""
    return path.with_name(f"{path.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A loaded SentencePiece model with the project's special ids."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID:
            raise ValueError(f"{model_path}: not trained with this project's special ids")

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Sentences -> subword ids (no BOS/EOS; the batcher adds them)."""
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Subword ids -> detokenized sentences; special ids are dropped. A sentence never
        contains a line break (not even one ``str.splitlines`` honours), so output written
        one sentence per line stays aligned with the input."""
        specials = {PAD_ID, BOS_ID, EOS_ID}
        texts = self.sp.decode([[i for i in seq if i not in specials] for seq in ids])
        return [LINE_BREAKS.sub(" ", t) for t in texts]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


def train_or_load(
    texts,
    cache_dir: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed: int = 1,
    key: str | None = None,
) -> Tokenizer:
    """Train SentencePiece on ``texts`` (or reuse the cached model for the same inputs).

    ``texts`` is an iterable of sentences, or a function returning one (called only when a
    model has to be trained). The cache key hashes ``key`` (e.g. a corpus fingerprint) or,
    without one, every training sentence one at a time, plus every setting, so changing
    either trains a new model. SentencePiece samples at most ``input_sentence_size``
    sentences (shuffled, from ``seed``), however long each is (``SPM_MAX_SENTENCE_BYTES``).
    Returns the Tokenizer; ``tokenizer.path`` is the file.
    """
    h = hashlib.sha256()
    if key is None and not callable(texts):
        texts = list(texts)  # hashed, then trained on: a generator would be used up by the hash
    if key is not None:
        h.update(f"key:{key}\n".encode())
    else:
        for t in texts() if callable(texts) else texts:
            h.update(t.encode("utf-8"))
            h.update(b"\n")
    settings = f"{vocab_size}|{model_type}|{character_coverage}|{input_sentence_size}|{seed}"
    # (models cached before the length limit was raised, or with a thread count per machine,
    # are not reused; nor is one another SentencePiece release trained: 0.2.2 and 0.2.3 cut
    # Multi30k into other pieces)
    settings += f"|every-length|threads{SPM_THREADS}|spm{spm.__version__}"
    h.update(settings.encode())
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"spm-{model_type}{vocab_size}-{h.hexdigest()[:16]}.model"
    if path.is_file():
        try:
            return Tokenizer(path)
        except (RuntimeError, ValueError) as e:  # "could not parse ModelProto from ..."
            from .corpus_cache import damaged_cache

            raise damaged_cache(path, e) from e
    texts = list(texts() if callable(texts) else texts)  # (a list already: it is small)
    longest = max((len(t.encode("utf-8")) for t in texts), default=0)

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the sentence sample is reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            max_sentence_length=max(SPM_MAX_SENTENCE_BYTES, longest),
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,  # tiny corpora (tests) may not support the full size
            num_threads=SPM_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:  # "INTERNAL: src/trainer_interface.cc(638) [check] reason"
        reason = SPM_CHECK.sub("", str(e).strip()) or str(e)
        raise ValueError(f"SentencePiece cannot train {vocab_size} pieces: {reason}") from e
    tmp = private_name(path)
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written model
    return Tokenizer(path)


def copy_into(tokenizer: Tokenizer, directory: str | Path, name: str) -> Path:
    """Copy the model file into ``directory/name`` (a run dir), returning the new path."""
    dst = Path(directory) / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or file_sha256(dst) != file_sha256(tokenizer.path):
        shutil.copyfile(tokenizer.path, dst)
    return dst
