"""Error reporting for the command-line entry points: one clear line, no traceback.

Expected faults (bad data, bad config values, unreadable checkpoints) are printed as
``error: <message>`` on stderr with exit status 1. ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import difflib
import errno
import functools
import itertools
import logging
import os
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import run_lock
from .checkpoint import CheckpointError
from .data import DataError

EXPECTED = (
    DataError,
    CheckpointError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,  # e.g. input=, ref= or output= naming a folder
    NotADirectoryError,
    OmegaConfBaseException,
    RuntimeError,
)
# a write the machine refused, wherever it happens (a checkpoint, a tokenizer copy, the
# encoded cache, a log): disk full, quota, file size limit, read-only file system
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def group_entries(conf_dir: Path, config_name: str) -> list[tuple[str, str, str]]:
    """(group path, package, default option) of each config group that the defaults list of
    the config ``config_name`` names: ``trainer/model@trainer: ${model}`` is
    ``("trainer/model", "trainer", "${model}")``."""
    entries = []
    top = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml"))
    for entry in top.get("defaults", []):
        if isinstance(entry, dict):
            ((name, option),) = entry.items()
            if not name.startswith("override "):
                path, _, package = name.removeprefix("optional ").partition("@")
                entries.append((path, package or path.replace("/", "."), str(option)))
    return entries


def yaml_keys(node: dict, prefix: str = "") -> set[str]:
    """The dotted key of every setting in a loaded YAML config (not its defaults list)."""
    keys = set()
    for key, value in node.items():
        if key not in ("defaults", "hydra"):
            keys.add(f"{prefix}{key}")
            if isinstance(value, dict):
                keys |= yaml_keys(value, f"{prefix}{key}.")
    return keys


def option_keys(group_dir: Path, option: str, seen: tuple = ()) -> set[str]:
    """The settings of a config group's option, with those of the options of the same group
    that its defaults list takes in (decode/beam.yaml builds on greedy.yaml)."""
    node = OmegaConf.to_container(OmegaConf.load(group_dir / f"{option}.yaml")) or {}
    keys = yaml_keys(node)
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry not in (*seen, option):
            if (group_dir / f"{entry}.yaml").is_file():
                keys |= option_keys(group_dir, entry, (*seen, option))
    return keys


def setting_keys(conf_dir: Path, config_name: str) -> tuple[dict[str, set[str]], set[str]]:
    """({every setting's dotted key in the config ``config_name`` and in every option of the
    groups its defaults list names: the options that have it, as ``group/path=option``, or
    "" for the config itself}, the group names). Read from the YAML files themselves, not
    the composed config, so that a key only another option has (a data set's own setting)
    counts as known and can be named with the options that have it."""
    known = {key: {""} for key in yaml_keys(OmegaConf.to_container(OmegaConf.load(
        conf_dir / f"{config_name}.yaml")))}  # fmt: skip
    groups = set()
    for path, package, _ in group_entries(conf_dir, config_name):
        groups.add(path.split("/")[0])
        known.setdefault(package, set()).add("")
        for file in sorted((conf_dir / path).glob("*.yaml")):
            for key in option_keys(conf_dir / path, file.stem):
                known.setdefault(f"{package}.{key}", set()).add(f"{path}={file.stem}")
    return known, groups


def chosen_options(argv: list[str], conf_dir: Path, config_name: str) -> dict | None:
    """{group path: the options that a run with ``argv`` composes; for a sweep, the
    default (which Hydra composes first, to set the sweep up) and each swept one}, or None
    where that is not plain to see: an option chosen by glob, or through an interpolation
    that names no group."""
    chosen = {path: [option] for path, _, option in group_entries(conf_dir, config_name)}
    parser = OverridesParser.create()
    for arg in argv:
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # a flag or a flag's value; override_error names a bad override
        path = override.key_or_group
        if path in chosen and not override.is_delete():
            if not override.is_sweep_override():
                given = [str(override.value())]
            else:
                try:  # a sweep (-m) first composes the default, then each option
                    given = [str(v) for v in override.sweep_string_iterator()]
                except HydraException:  # glob(...)
                    return None
            if any(not (conf_dir / path / f"{o}.yaml").is_file() for o in given):
                return None  # no such option: override_error names it, whatever the order
            chosen[path] = given if not override.is_sweep_override() else list(
                dict.fromkeys(chosen[path] + given))  # fmt: skip
    for path, options in chosen.items():  # trainer/model@trainer: ${model}
        if len(options) == 1 and options[0].startswith("${") and options[0].endswith("}"):
            chosen[path] = chosen.get(options[0][2:-1], options)
    if any("${" in option for options in chosen.values() for option in options):
        return None
    return chosen


def option_missing(owners: set[str], chosen: dict[str, list[str]]) -> str | None:
    """A choice of options (``model=transformer``) that a run composes and none of the
    ``owners`` of a setting is in, or None."""
    paths = sorted({owner.split("=")[0] for owner in owners})
    for choice in itertools.product(*(chosen.get(path, []) for path in paths)):
        picked = [f"{path}={option}" for path, option in zip(paths, choice)]
        if not owners.intersection(picked):
            return " and ".join(picked)
    return None


def check_added_keys(overrides, conf_dir: Path, config_name: str, open_under=()) -> None:
    """A key added on the command line (``+trainer.max_step=2``, ``++data.max_lenght=20``)
    that is no setting would be carried along and read by nothing: Hydra's own error for an
    unknown key suggests the ``+``, and a misspelt key then trains as if it had not been
    given. Such a key fails here, with the nearest setting's name. Keys under
    ``open_under`` (a model's keyword arguments, an optimizer's) are checked where they are
    used; config groups (``+group=option``) and Hydra's own keys are left to Hydra."""
    known, groups = setting_keys(conf_dir, config_name)
    for override in overrides:
        if not override.startswith("+"):
            continue  # without a +: override_error, before Hydra composes the config
        key = override.split("=", 1)[0].lstrip("+")
        if hydras_to_check(key, groups):
            continue
        if key in known or any(key == p or key.startswith(f"{p}.") for p in open_under):
            continue
        raise ValueError(
            f"{override}: {key} is not a setting, so nothing would read it "
            f"({nearest(key, known)}--cfg job prints every setting)"
        )


def hydras_to_check(key: str, groups: set[str]) -> bool:
    """Whether Hydra itself checks the override of ``key``: a config group (by name, path
    or package) or one of Hydra's own settings."""
    return "/" in key or "@" in key or key in groups or key.split(".")[0] == "hydra"


def nearest(key: str, known: set[str]) -> str:
    """ "did you mean X? " for the setting nearest to ``key``, or nothing."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"did you mean {close[0]}? " if close else ""


# Hydra's command-line flags that take the next argument as their value (--info's is optional)
VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn",
               "--config-name", "-cd", "--config-dir", "--experimental-rerun"}  # fmt: skip
MULTIRUN = {"-m", "--multirun"}
SWEEP_NOTE = ", which this sweep composes (Hydra composes the defaults first)"
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def override_error(
    argv: list[str], conf: Path | None = None, config_name: str | None = None, open_under=()
) -> str | None:
    """Why an override in ``argv`` cannot work, naming it, or None. Hydra's own messages
    for these are several lines, or a traceback, and name the text it stopped at rather
    than the argument:

    - the override grammar (``trainer.lr=[1,``, a key without ``=``);
    - with ``conf``, the config folder: a config group set to null (``trainer=null``, a
      traceback from inside Hydra) or to an option it does not have (``model=foo``),
      named with the group's options;
    - with ``config_name`` too: a key set or deleted without a ``+`` that is no setting
      (``trainer.max_step=20``), with the nearest setting's name. Keys added with a ``+``
      are ``check_added_keys``'s; for a key under ``open_under`` (a model's or an
      optimizer's keyword arguments) the message also says that a ``+`` adds it. A key that
      only other options have (``model.hidden_size`` with ``model=transformer``) is named
      with the options that have it."""
    parser, i = OverridesParser.create(), 0
    known, groups = setting_keys(conf, config_name) if conf and config_name else (None, set())
    composed = chosen_options(argv, conf, config_name) if known is not None else None
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg.startswith("-"):  # a flag, and the value it takes
            info = arg in ("-i", "--info") and i < len(argv) and argv[i] in INFO_CHOICES
            i += arg in VALUE_FLAGS or info
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as e:
            return (
                f"{arg}: {one_line(e)} (overrides are key=value; quote a value with spaces or "
                "brackets: https://hydra.cc/docs/advanced/override_grammar/basic/)"
            )
        key = override.key_or_group
        group = conf / key if conf is not None else None  # a package (@) is not in the key
        if group is not None and group.is_dir() and not override.is_delete():
            if known is not None and key.split("/")[0] not in groups and not override.is_add():
                # (Hydra's 3 lines advised a + that then failed another way)
                return (
                    f"{arg}: {config_name}.py takes no {key}= (its config groups: "
                    f"{', '.join(sorted(groups))})"
                )
            if error := group_error(arg, override, group):
                return error
            continue
        plain = not (override.is_add() or override.is_force_add())
        if known is None or not plain or hydras_to_check(key, groups):
            continue
        if key in known:
            owners = known[key]
            if "" in owners or composed is None:
                continue
            if missing := option_missing(owners, composed):
                return (
                    f"{arg}: {key} is a setting of {' and '.join(sorted(owners))} only, not "
                    f"of {missing}{SWEEP_NOTE * bool(MULTIRUN.intersection(argv))} (--cfg "
                    "job prints every setting)"
                )
            continue
        hint = nearest(key, known)
        takes_keywords = tuple(p for p in open_under if p != "decode")  # decode takes none
        if not override.is_delete() and any(key.startswith(f"{p}.") for p in takes_keywords):
            hint += f"+{arg} adds a keyword argument; "  # a model's or an optimizer's own
        return f"{arg}: {key} is not a setting ({hint}--cfg job prints every setting)"
    return None


def group_error(arg: str, override, group: Path) -> str | None:
    """Why ``override`` (the argument ``arg``) cannot choose an option of the config group
    in the folder ``group``: it sets it to null, or to an option the folder has no file for
    (each value of a sweep is checked). None when it can."""
    key = override.key_or_group
    options = sorted(p.stem for p in group.glob("*.yaml"))
    try:
        chosen = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.value()]
        )
    except HydraException:  # glob(...): Hydra expands it against the folder itself
        return None
    for value in chosen:
        if value is None:
            return f"{arg}: {key} is a config group: name one of {options}"
        if isinstance(value, str) and "${" not in value:
            if not (group / f"{value}.yaml").is_file():
                return f"{arg}: {key} has no option {value!r}: name one of {options}"
    return None


def unwritable_run_dir(argv: list[str]) -> str | None:
    """Why Hydra could not create the ``hydra.run.dir=`` given in ``argv`` (a file on its
    path, a folder without write permission), or None. Hydra creates it before the task runs,
    so its error was a traceback from inside Hydra; a value with an interpolation is left
    to Hydra."""
    given = single_run_value(argv, "hydra.run.dir")
    if given is None:
        return None
    folder = Path(given).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"hydra.run.dir={given}: {folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"hydra.run.dir={given}: cannot create folders in {folder}"
    try:  # what Hydra does next; os.access lets root through where the file system will not
        Path(given).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"hydra.run.dir={given}: cannot create it: {e.strerror}"
    return None


def busy_run_dir(argv: list[str]) -> str | None:
    """Why the run folder named in ``argv`` cannot take this run: another training run
    holds its lock. The trainer refuses that run too, but only once Hydra has run, which
    has by then written its ``.hydra/`` files over the running run's and added to its
    ``train.log``; this says it first. Under torchrun only rank 0 asks (rank 0 holds the
    lock for every rank)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    if any(a.startswith("run_dir=") for a in argv):
        given = single_run_value(argv, "run_dir")
    else:
        given = single_run_value(argv, "hydra.run.dir")
    owner = given and run_lock.holder(Path(given))
    return run_lock.in_use(given, owner) if owner else None


def shared_sweep_run_dir(argv: list[str]) -> str | None:
    """Why a sweep (-m) cannot take the ``run_dir=`` it was given: one folder for every job,
    where each job resumed the run of the one before (a finished one: it trained nothing,
    and rewrote the folder's config and results with its own settings). A value swept or
    interpolated per job is fine."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    given = values_given(argv, "run_dir")
    if not given or any(c in given[-1] for c in (",", "${", "(")):
        return None
    return (
        f"run_dir={given[-1]} with -m is one folder for every job of the sweep, each of which "
        "would resume the one before; give hydra.sweep.dir=DIR instead (a folder per job: "
        "DIR/MODEL_N)"
    )


def refused_resume(argv: list[str], conf: Path) -> str | None:
    """Why the run folder named in ``argv`` (``run_dir=`` or ``hydra.run.dir=``) cannot be
    resumed with these settings (another model, tokenizer or optimizer class than its
    checkpoints'): the trainer refuses it too, but only once Hydra has written this
    command's ``.hydra/`` files (config, overrides) over the run's own, which then named
    settings the run never trained with. None when it can, or when that is not plain to
    see (a sweep, another config, a value Hydra resolves)."""
    given = single_run_value(argv, "run_dir") or single_run_value(argv, "hydra.run.dir")
    if given is None or any(a.startswith("-") for a in argv):
        return None
    from hydra import compose, initialize_config_dir

    from .resuming import refused_resume as judged

    run = Path(given)
    if not (run / "config.yaml").is_file():
        return None
    overrides = [a for a in argv if not a.startswith(("hydra.", "run_dir="))]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf.resolve())):
            cfg = compose("train", overrides=[*overrides, f"run_dir={given}"])
    except Exception:  # a bad override: Hydra and override_error say it their way
        return None
    return judged(run, cfg)


def values_given(argv: list[str], key: str) -> list[str]:
    """Every value ``argv`` gives ``key`` (``key=VALUE``), in order: the last is Hydra's."""
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]


def single_run_value(argv: list[str], key: str) -> str | None:
    """The last ``key=`` value in ``argv``; None when not given, when it holds an
    interpolation (Hydra's to resolve), or in a sweep (-m: each job's own)."""
    given = values_given(argv, key)
    if not given or "${" in given[-1] or {"-m", "--multirun"} & set(argv):
        return None
    return given[-1]


def run_dir_is_hydras(argv: list[str]) -> list[str]:
    """``argv`` with ``hydra.run.dir=X`` added for a ``run_dir=X`` given without one, so
    that Hydra's own files (train.log, .hydra/) go to the run folder too and not to a new
    folder under outputs/. Not for a sweep (-m: one run_dir for every job would be shared)
    or a value with an interpolation."""
    given = single_run_value(argv, "run_dir")
    if given is None or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, f"hydra.run.dir={given}"]


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` on one line: its first line, and the next one too where the
    first only introduces it (ends with ':', as Hydra's "Error in call to target '...':" and
    torch's "Error(s) in loading state_dict for ...:" do)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    msg = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def friendly_errors(fn):
    """Wrap a Hydra task function so expected errors end the program with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            # the trainer's says "interrupted at step N; ..." itself
            print(str(e) or "interrupted", file=sys.stderr)
            sys.exit(130)
        except (*EXPECTED, OSError) as e:
            refused_write = isinstance(e, OSError) and e.errno in WRITE_ERRNOS
            if not (isinstance(e, EXPECTED) or refused_write):
                raise  # another OSError: a bug or a fault worth its traceback
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            logging.getLogger(__name__).debug("error", exc_info=True)
            if refused_write:  # the file written is the second name of a copy
                where = e.filename2 or e.filename
                message = f"cannot write {where}: {e.strerror}" if where else one_line(e)
            else:
                message = one_line(e)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)

    return wrapper
