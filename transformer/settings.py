"""The run's settings, checked before any work (a bad value fails naming its key, not after
the corpus is encoded or at the first evaluation), and the device they name.

``TrainingError`` is the one fault type these checks and the trainer raise; the entry points
print it as one line (``cli.py``).
"""

from __future__ import annotations

import inspect
import logging
import platform
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from .values import as_path_text, is_count, is_flag, is_integer, is_number, is_seed

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A fault that stops training with a clear message."""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which a CPU speed figure needs: this project's
    2-core machines were an AMD EPYC one day and an Intel Xeon another, and tables that
    named the CPU by ``platform.processor()`` (empty on Linux) said only "x86_64"."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    return name or platform.processor() or platform.machine() or "cpu"


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` = cuda when available, else cpu. Under torchrun (``local_rank`` given) a
    CUDA device is always ``cuda:LOCAL_RANK``: one GPU per process."""
    name = str(name)  # device=1 on the command line is an int
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={name} requested but CUDA is not available")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TrainingError(
            f"device={name}: not a device torch knows (auto, cpu, cuda, cuda:N)"
        ) from e
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"device={name} requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: failed after the data
        raise TrainingError(f"device={name}: not a device to run on (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


# torch.compile's modes (``trainer.compile_mode``), and those that replay CUDA graphs
# (torch._inductor.list_mode_options(): triton.cudagraphs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "bf16-weights")


def resolve_precision(precision, device: torch.device) -> str:
    """``trainer.precision`` on ``device``, checked. ``auto``: bf16 autocast on a GPU with
    bf16 tensor cores (compute capability 8.0 and up: A100, H100, RTX 30xx and later), else
    fp32: below 8.0 PyTorch emulates bf16 products in fp32, and fp16 (with its grad scaler,
    for the tensor cores of 7.x: V100, T4) has not been run on a GPU here, so it is not
    picked for anyone. On the CPU bf16 and fp16 autocast run as fp32, bf16-weights as
    asked."""
    if precision not in PRECISIONS:
        raise TrainingError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if device.type != "cuda":
        return precision if precision == "bf16-weights" else "fp32"
    capability = torch.cuda.get_device_capability(device)
    if precision == "auto":
        precision = "bf16" if capability >= (8, 0) else "fp32"
        log.info("trainer.precision=auto: %s on %s (compute capability %d.%d)",
                 precision, torch.cuda.get_device_name(device), *capability)  # fmt: skip
    elif precision.startswith("bf16") and capability < (8, 0):
        log.warning(
            "trainer.precision=%s on %s (compute capability %d.%d): no tensor cores for bf16 "
            "there (PyTorch emulates its products in fp32); trainer.precision=auto picks fp32",
            precision, torch.cuda.get_device_name(device), *capability,
        )  # fmt: skip
    return precision


# trainer settings that count something and must be at least 1 (or 0, second list)
AT_LEAST_ONE = ("accum_steps", "max_steps", "max_epochs", "warmup_steps", "eval_every",
                "bleu_every", "log_every", "max_nonfinite")  # fmt: skip
AT_LEAST_ZERO = ("patience", "keep_checkpoints", "oom_retries", "data_workers")


def check_schedule(t) -> None:
    """Counts of the schedule that would otherwise fail mid-run (a division by zero after
    the first update, an abort at the first log) or make no sense fail now, naming the key."""
    for keys, least in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for key in keys:
            value = t[key]
            if not is_count(value, least):
                raise TrainingError(f"trainer.{key} must be an integer >= {least}, got {value!r}")
    if t.packed_rows != "auto" and not is_count(t.packed_rows, 0):
        raise TrainingError(
            f"trainer.packed_rows must be auto or an integer >= 0, got {t.packed_rows!r}"
        )
    smoothing = t.label_smoothing
    if not (is_number(smoothing) and 0 <= smoothing < 1):
        raise TrainingError(
            f"trainer.label_smoothing must be a number in [0, 1), got {smoothing!r}"
        )
    check_positive(t, "clip_norm")
    check_positive(t, "max_time_minutes", or_null=True)


def check_positive(t, key: str, or_null: bool = False) -> None:
    """trainer.``key`` is a number > 0 (or null, where ``or_null``)."""
    value = t[key]
    if not ((is_number(value) and value > 0) or (or_null and value is None)):
        allowed = "a number > 0" + (" or null" if or_null else "")
        raise TrainingError(f"trainer.{key} must be {allowed}, got {value!r}")


def check_choices(t) -> None:
    """trainer settings with a fixed set of values (precision and sdpa_backends: where they
    are used, also before the data is read)."""
    mode = t.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise TrainingError(
            f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}"
        )
    for key in ("cpu_malloc_reuse", "compile", "resume", "progress_bar"):
        value = t.get(key, True)  # a string such as "no" would count as true
        if not is_flag(value):
            raise TrainingError(f"trainer.{key} must be true or false, got {value!r}")
    if t.fused_loss != "auto" and not is_flag(t.fused_loss):
        raise TrainingError(f"trainer.fused_loss must be auto, true or false, got {t.fused_loss!r}")


def check_distributed(t) -> None:
    """The torchrun settings, checked before the process group is joined (a misspelt
    backend failed inside torch's init_process_group) and in a one-process run too, where
    they are not used: a trial run on one device finds them before a multi-GPU launch."""
    backends = ("auto", *(b for b in dist.Backend.backend_list if b != "undefined"))
    if t.dist_backend not in backends:
        raise TrainingError(
            f"trainer.dist_backend must be one of {', '.join(backends)}, got {t.dist_backend!r}"
        )
    check_positive(t, "dist_timeout_minutes")


# data settings that count something, with their least value: SentencePiece needs room for
# the 4 special pieces and one more; 0 sampled sentences would train it on none; a mapped
# budget of 0 MB never releases pages (it failed only after the training split was encoded)
DATA_COUNTS = (("max_len", 1), ("max_tokens", 1), ("vocab_size", 5),
               ("spm_input_sentence_size", 1), ("num_proc", 1),
               ("mapped_budget_mb", 0))  # fmt: skip
SPM_MODEL_TYPES = ("unigram", "bpe", "char", "word")
# data settings that name a file, folder or dataset (data.data_dir=2023 reaches us as a number)
DATA_PATH_KEYS = ("name", "data_dir", "cache_dir", "hub_name", "hub_config", "hub_revision",
                  "hub_data_dir")  # fmt: skip


# The shipped corpus settings (conf/data/NAME.yaml), each naming its Hugging Face dataset
CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"


def hub_owner(hub_name) -> str | None:
    """The corpus of ``conf/data/`` whose ``hub_name`` is ``hub_name``, or None."""
    for path in sorted(CONF_DATA.glob("*.yaml")):
        shipped = OmegaConf.load(path)
        if shipped.get("hub_name") == hub_name:
            return str(shipped.get("name", path.stem))
    return None


def check_data_source(d) -> None:
    """Where the corpus is read from: ``data.data_dir`` made empty (``data.data_dir=$ROOT``
    with ROOT unset, or MT_DATA_DIR set to nothing) read the Hub dataset instead, and so
    did a corpus of one's own (``data.name=mine``) without a ``data.data_dir``: Multi30k's,
    from data=multi30k's ``data.hub_name``, under the name of one's own."""
    if d.get("data_dir") == "":
        raise TrainingError(
            "data.data_dir is empty (an unset variable, as in data.data_dir=$ROOT, or "
            "MT_DATA_DIR set to nothing): name the folder that holds "
            f"{d.name}/{{split}}.{{lang}}, or make it null to read data.hub_name from the Hub"
        )
    if d.get("data_dir") is None and d.get("hub_name"):
        owner = hub_owner(d.hub_name)
        if owner is not None and owner != d.name:
            raise TrainingError(
                f"data.name={d.name}, but data.data_dir is null and data.hub_name="
                f"{d.hub_name} is corpus {owner}'s Hub dataset: set data.data_dir to the "
                f"folder that holds {d.name}/{{split}}.{{lang}} (or data.hub_name to "
                f"{d.name}'s Hub dataset)"
            )


# Settings that hold settings. Made null (trainer.optimizer=null) they failed deep inside
# with "'NoneType' object has no attribute ..."; data.hub_splits is optional.
SECTIONS = ("data", "model", "trainer", "decode", "trainer.optimizer", "trainer.final")
OPTIONAL_SECTIONS = ("data.hub_splits",)


def check_sections(cfg) -> None:
    """Each of ``SECTIONS`` (and ``OPTIONAL_SECTIONS`` where given) is a group of settings."""
    absent = object()
    for key in SECTIONS + OPTIONAL_SECTIONS:
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent and key in OPTIONAL_SECTIONS:
            continue
        if not OmegaConf.is_dict(value):
            got = "nothing (the key is missing)" if value is absent else repr(value)
            raise TrainingError(
                f"{key} must be a group of settings, got {got}; set its keys one by one "
                f"({key}.NAME=VALUE)"
            )


def check_data_settings(cfg) -> None:
    """Data settings that would fail late or silently: one embedding for source and target
    needs one vocabulary (with two tokenizers of the same size, source piece N and target
    piece N would share a row unnoticed), the counts of ``DATA_COUNTS`` (data.max_len=0
    would drop every pair, after encoding the whole corpus), positions for data.max_len
    tokens in the Transformer (a longer batch would fail mid-run), the SentencePiece settings
    (refused by SentencePiece only after the corpus is read, in its own words),
    test_splits and langs are lists of names, and no evaluation split is the training
    split (it would be encoded once, as training pairs, and fail at the first evaluation)."""
    if cfg.model.get("share_src_tgt_embeddings") and not cfg.data.joint_vocab:
        raise TrainingError(
            "model.share_src_tgt_embeddings=true needs data.joint_vocab=true: with separate "
            "vocabularies the same id names different pieces on each side; set "
            "model.share_src_tgt_embeddings=false (or data.joint_vocab=true)"
        )
    d = cfg.data
    for key in DATA_PATH_KEYS:
        try:
            if key in d:
                as_path_text(d, key, f"data.{key}")
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if not d.get("name"):
        raise TrainingError(f"data.name must be the corpus's name, got {d.get('name')!r}")
    check_data_source(d)
    if not d.get("cache_dir"):
        raise TrainingError(
            "data.cache_dir must name a folder (tokenizers and encoded corpora are kept "
            f"there), got {d.get('cache_dir')!r}"
        )
    for key, least in DATA_COUNTS:
        if key in d and not is_count(d[key], least):
            raise TrainingError(f"data.{key} must be an integer >= {least}, got {d[key]!r}")
    positions = cfg.model.get("max_positions")
    if is_count(positions, 1) and positions < d.max_len + 1:  # else the model names it
        raise TrainingError(
            f"model.max_positions={positions} is too small for data.max_len={d.max_len}: a "
            f"training pair takes up to {d.max_len + 1} positions (the source's EOS, the "
            "target's BOS)"
        )
    if d.spm_model_type not in SPM_MODEL_TYPES:
        raise TrainingError(
            f"data.spm_model_type must be one of {', '.join(SPM_MODEL_TYPES)}, "
            f"got {d.spm_model_type!r}"
        )
    coverage = d.character_coverage
    if not (is_number(coverage) and 0.98 <= coverage <= 1):  # SentencePiece's own bounds
        raise TrainingError(
            f"data.character_coverage must be a number in [0.98, 1], got {coverage!r}"
        )
    if not is_flag(d.joint_vocab):
        raise TrainingError(f"data.joint_vocab must be true or false, got {d.joint_vocab!r}")
    for key, what in (("test_splits", "split names"), ("langs", "language codes")):
        names = d.get(key, [])
        if OmegaConf.is_list(names) and any(isinstance(x, bool) for x in names):
            what += " (YAML reads no, yes, on and off as false or true: quote them, 'no')"
        check_list(names, f"data.{key}", what, lambda x: isinstance(x, str))
    for key, names in (("valid_split", [d.valid_split]), ("test_splits", d.test_splits)):
        if d.train_split in names:  # encoded once, as training pairs: filtered, no text
            raise TrainingError(
                f"data.{key} names the training split {d.train_split!r}: evaluate on a "
                "held-out split"
            )


def check_list(values, key: str, what: str, ok) -> None:
    """The setting ``key`` is a list (not a lone value) whose every item passes ``ok``."""
    if not OmegaConf.is_list(values) or not all(ok(v) for v in values):
        raise TrainingError(f"{key} must be a list of {what}, got {values!r}")


def check_final(t) -> None:
    """trainer.final settings that would only fail at the end of training fail now."""
    n = t.final.average_last
    if not is_count(n, 0):
        raise TrainingError(f"trainer.final.average_last must be an integer >= 0, got {n!r}")
    if n > t.keep_checkpoints:
        log.warning(
            "trainer.final.average_last=%d but trainer.keep_checkpoints=%d: the final "
            "average takes the %d kept step checkpoints (none under 2)",
            n,
            t.keep_checkpoints,
            t.keep_checkpoints,
        )
    for key, what, ok in (("length_penalties", "numbers", is_number),
                          ("beam_sizes", "integers", is_integer)):  # fmt: skip
        check_list(t.final[key], f"trainer.final.{key}", what, ok)
    if any(k < 1 for k in t.final.beam_sizes):
        raise TrainingError(f"trainer.final.beam_sizes must be >= 1, got {t.final.beam_sizes}")
    if any(a < 0 for a in t.final.length_penalties):
        raise TrainingError(
            f"trainer.final.length_penalties must be >= 0, got {t.final.length_penalties}"
        )


def implementation(make) -> dict:
    """The keywords the trainer adds to those of ``trainer.optimizer`` (``make``, its
    partial): ``fused=True`` where the class offers it and the settings choose neither
    ``fused`` nor ``foreach`` (a choice made there stands: ``fused=false`` was overridden
    unseen, and ``foreach=true`` failed against the added ``fused`` after the data was
    read)."""
    offered = "fused" in inspect.signature(make.func).parameters
    if not offered or {"fused", "foreach"} & make.keywords.keys():
        return {}
    return {"fused": True}


def check_optimizer(t) -> None:
    """``trainer.optimizer``'s values checked against the types of its keywords' defaults,
    then the optimizer built once for a stand-in parameter and stepped once: a class that
    does not exist, a value of the wrong type (``amsgrad=yes``, one beta) or one it
    refuses (a negative lr) fails now, naming the setting, not once the data is read and
    the model built (a wrongly typed flag failed only inside the trainer's first fused
    update, as a traceback; the stand-in is not fused, as a CPU may not offer it)."""
    target = t.optimizer.get("_target_")
    try:
        make = instantiate(t.optimizer)
    except InstantiationException as e:
        reason = e.__cause__ if e.__cause__ is not None else e
        raise TrainingError(f"trainer.optimizer: {target}: {reason}") from e
    parameters = inspect.signature(make.func).parameters
    for key, value in make.keywords.items():
        default = parameters[key].default if key in parameters else None
        if why := wrong_type(value, default):
            raise TrainingError(f"trainer.optimizer.{key} must be {why}, got {value!r}")
    stand_in = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = make([stand_in])
        stand_in.grad = torch.zeros(1)
        optimizer.step()
    except (ValueError, TypeError, IndexError, RuntimeError) as e:
        raise TrainingError(f"trainer.optimizer ({target}): {e}") from e


def wrong_type(value, default) -> str | None:
    """What a value must be that is not of its keyword's default's type (true or false, a
    number, a list of as many numbers as the default tuple), or None. Keywords without a
    default of those types (None, a tensor) are the optimizer's to check."""
    if isinstance(default, bool):
        return None if is_flag(value) else "true or false"
    if is_number(default):
        return None if is_number(value) else "a number"
    if isinstance(default, tuple) and all(is_number(d) for d in default):
        fits = isinstance(value, (list, tuple)) and len(value) == len(default)
        if fits and all(is_number(v) for v in value):
            return None
        return f"a list of {len(default)} numbers"
    return None


def check_seed(seed) -> None:
    if not is_seed(seed):
        raise TrainingError(f"seed must be an integer in [0, 2**64), got {seed!r}")
