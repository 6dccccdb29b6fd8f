"""Type checks of configured values, shared by the run's settings checks (settings.py), the
decode options (translator.py) and the models (seq2seq.py). No Hydra import, so that the
models can use them too."""


def is_integer(value) -> bool:
    """An int, and not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value, least: int) -> bool:
    """An integer of at least ``least``."""
    return is_integer(value) and value >= least


def is_seed(value) -> bool:
    """An integer in [0, 2**64): what torch's generators take."""
    return is_count(value, 0) and value < 2**64


def path_text(value, key: str) -> str | None:
    """A path or name given on the command line, as text. YAML reads ``input=2024`` or
    ``data.name=123`` as a number; an integer's digits are the text meant. Anything else
    that is not text (a float, whose digits YAML has already rewritten, true, a list) is an
    error naming ``key``; None stays None."""
    if value is None or isinstance(value, str):
        return value
    if is_integer(value):
        return str(value)
    raise ValueError(f"{key} must be a path or name, got {value!r}: quote it, {key}=\"'...'\"")


def as_path_text(node, key: str, name: str) -> None:
    """``node[key]`` (a config mapping) made ``path_text``: an integer becomes its digits,
    in place; text, and an interpolation behind it, is left as it is."""
    text = path_text(node[key], name)
    if text != node[key]:
        node[key] = text


def is_flag(value) -> bool:
    """True or false, and not 1 or 0 (which ``value in (True, False)`` lets through) or a
    string (any non-empty string, "no" too, would count as true)."""
    return isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
